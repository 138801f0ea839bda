"""Sizes that must not blow up (issue #26, 3): the identical-embedding check is O(C) in memory, long text
encodings show progress, warnings name the first few and count the rest."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from siglip_dola.text_bank.bank import identical_rows, warn_indistinct
from siglip_dola.text_bank.build import build_text_bank


def _naive_groups(unit: torch.Tensor, tolerance: float) -> list[list[int]]:
    """Reference: a float64 loop over every pair (cosine >= 1 - tolerance), groups by transitive closure."""
    rows = unit.double().tolist()
    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(rows)), 2):
        if sum(a * b for a, b in zip(rows[i], rows[j])) >= 1.0 - tolerance:
            parent[root(j)] = root(i)
    groups = {}
    for i in range(len(rows)):
        groups.setdefault(root(i), []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)


def test_identical_rows_match_an_all_pairs_reference():
    torch.manual_seed(0)
    embeds = torch.randn(120, 32, dtype=torch.float64)
    embeds[7] = embeds[3]                       # exact copies
    embeds[50] = embeds[3] * 2.0                # same direction, other norm
    embeds[90] = embeds[11] + 1e-7              # float-rounding apart
    embeds[91] = embeds[11] - 1e-7
    unit = F.normalize(embeds, dim=-1)
    assert sorted(identical_rows(unit)) == _naive_groups(unit, 1e-6) == [[3, 7, 50], [11, 90, 91]]


def test_identical_rows_is_linear_in_memory():
    """200,000 rows: the old C x C float64 matrix would need 320 GB; the hashed check needs the rows."""
    torch.manual_seed(1)
    unit = F.normalize(torch.randn(200_000, 16, dtype=torch.float64), dim=-1)
    unit[123_456] = unit[42]
    assert identical_rows(unit) == [[42, 123_456]]


def test_a_warning_names_the_first_few_and_counts_the_rest():
    labels = [f"word{i}" for i in range(10_000)]
    embeds = torch.ones(10_000, 8)  # every label encodes the same
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_indistinct(labels, embeds, "model 'x'")
    (message,) = [str(w.message) for w in caught]
    assert len(message) < 1000 and "10000 of 10000 classes" in message and "and 9995 more" in message


def test_long_text_encodings_show_progress_unless_asked_not_to(tiny_loaded, capsys):
    labels = [f"red circle {i}" for i in range(300)]  # 300 prompts: two encoder batches of 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer reads few of these words
        build_text_bank(tiny_loaded, labels)
        assert "encoding 301 texts" in capsys.readouterr().err  # the labels and the unreadable-word probe
        build_text_bank(tiny_loaded, labels, progress=False)
        assert "encoding" not in capsys.readouterr().err
        build_text_bank(tiny_loaded, labels[:5])
        assert "encoding" not in capsys.readouterr().err  # one batch: no bar


@pytest.mark.parametrize("command", [["classify", "--labels-file"], ["rerank", "--texts-file"]])
def test_cli_no_progress_hides_the_text_bar(tiny_siglip_folder, tmp_path, capsys, command):
    from siglip_dola.cli import main
    from siglip_dola.data import shapes

    shapes.export(tmp_path, n=1)
    (tmp_path / "labels.txt").write_text("".join(f"red circle {i}\n" for i in range(300)))
    argv = [command[0], str(tmp_path / "test_0_00000.png"), command[1], str(tmp_path / "labels.txt"),
            "--model", str(tiny_siglip_folder), "--top-k", "1"]
    assert main(argv) == 0
    assert "encoding" in capsys.readouterr().err
    assert main(argv + ["--no-progress"]) == 0
    assert "encoding" not in capsys.readouterr().err
