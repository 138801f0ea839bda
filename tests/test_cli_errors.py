"""The shared CLI machinery (siglip_dola/cli/__init__.py): one-line errors naming flags, one exit-code rule,
defaults in --help, --version, install hints, hostile inputs given to every command."""
import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siglip_dola import cli
from siglip_dola.cli import EXIT_ERROR, main
from siglip_dola.modes import MODES


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exited:  # argparse's own errors
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    assert main(["shapes", "export", str(folder), "--n", "4"]) == 0
    return folder


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("siglip-dola 0.")


@pytest.mark.parametrize("command", [["classify"], ["rerank"], ["search"], ["index", "build"], ["index", "add"],
                                     ["calibrate"], ["eval"], ["demo"], ["shapes", "export"]])
def test_help_shows_defaults_and_the_exit_status(capsys, command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 success; 1 finished but some input files were skipped" in text
    if command in (["classify"], ["search"]):
        # settings flags default to the calibration's value, else the design note's: the help names both
        for shown in (f"--mode {{{','.join(MODES)}}} DoLa mode (default: the calibration's, else dynamic)",
                      "(default: the calibration's, else 0.1)",
                      "--batch-size BATCH_SIZE (default: 32)" if command == ["classify"] else "(default: 10)"):
            assert shown in text


def test_type_errors_keep_their_message_in_one_line(capsys, shapes_dir):
    code, out, err = run(capsys, "classify", shapes_dir, "--labels", "red circle,blue square", "--layers", "a,b")
    assert code == 2 and out == ""
    assert "--layers must be comma-separated ints such as 18,20,22, got 'a,b'" in err
    assert "invalid parse_layers value" not in err and "usage:" not in err


@pytest.mark.parametrize("extra,expected", [
    (["--alpha", "3"], "--alpha must be in (0, 1], got 3.0"),
    (["--top-k", "0"], "--top-k must be a positive int, got 0"),
    (["--static-layer", "20"], "--static-layer is only used with --mode static"),
    (["--mode", "static", "--static-layer", "99"], "--static-layer 99 out of range: valid layers are 1..23"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_library_messages_name_the_flags(capsys, shapes_dir, extra, expected):
    code, out, err = run(capsys, "classify", shapes_dir, "--labels", "red circle,blue square", *extra)
    assert code == 2 and expected in err, err
    assert "top_k" not in err and "static_layer" not in err and "mode='" not in err


def test_flag_words_rewrites_parameters_not_prose():
    flags = {"top_k": "--top-k", "mode": "--mode", "alpha": "--alpha", "overwrite": "--overwrite",
             "model": "--model"}
    assert cli.flag_words("top_k must be >= 1; mode must be one of ('off',)", flags) == \
        "--top-k must be >= 1; --mode must be one of ('off',)"
    assert cli.flag_words("static_layer is only used with mode='static'", {"static_layer": "--static-layer", **flags}) \
        == "--static-layer is only used with --mode static"
    assert cli.flag_words("pass overwrite=True to replace it", flags) == "pass --overwrite to replace it"
    assert cli.flag_words("index was built with model 'x'; the mode of", flags) == "index was built with model 'x'; the mode of"


def test_index_errors_name_the_subcommand(capsys, tmp_path):
    code, _, err = run(capsys, "index", "build", tmp_path / "missing", "--out", tmp_path / "idx")
    assert code == 2 and err.startswith("siglip-dola index build: error:")
    code, _, err = run(capsys, "index", "add", tmp_path / "no-index", tmp_path)
    assert code == 2 and err.startswith("siglip-dola index add: error:")


def test_search_with_a_bad_image_or_a_folder_is_one_line(capsys, shapes_dir, tmp_path):
    captions = tmp_path / "caps.csv"
    captions.write_text("caption\nred circle\nblue square\n")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for image, reason in ((bad, "UnidentifiedImageError"), (shapes_dir, "a folder")):
        code, out, err = run(capsys, "search", "--captions", captions, "--image", image)
        assert code == 2 and out == "" and reason in err and str(image) in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_optional_dependency_gets_an_install_hint(capsys, monkeypatch):
    import siglip_dola.data.datasets as datasets
    for name in [m for m in sys.modules if m.startswith("clip_benchmark.datasets")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as in a new process
    monkeypatch.setitem(sys.modules, "requests", None)  # as in an environment without requests
    code, _, err = run(capsys, "eval", "--dataset", "cifar10", "--out", "unused.json", "--limit", "2")
    assert code == 2 and "requests" in err and "pip install" in err and "Traceback" not in err
    assert datasets.CLIP_BENCHMARK_HINT in err


def test_skipped_files_rule_is_the_same_for_every_command(capsys, shapes_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for png in sorted(shapes_dir.glob("*.png"))[:2]:
        (folder / png.name).write_bytes(png.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG nope")
    runs = {
        "classify": ["classify", folder, "--labels", "red circle,blue square"],
        "rerank": ["rerank", folder, "--texts", "a red circle,a blue square"],
        "rerank --query": ["rerank", folder, "--query", "a red circle"],
        "index build": ["index", "build", folder, "--out", tmp_path / "idx", "--quiet"],
    }
    for name, argv in runs.items():
        code, out, err = run(capsys, *argv)
        assert code == 1, name
        assert "broken.png" not in out and f"skipped {folder / 'broken.png'}" in err.replace(str(folder.resolve()), str(folder)), name


def test_rerank_table_aligns_long_items(capsys, shapes_dir):
    long = "a red circle on a plain white background drawn large and bold"
    code, out, _ = run(capsys, "rerank", sorted(shapes_dir.glob("*.png"))[0], "--texts", f"{long},a blue square")
    rows = [line for line in out.splitlines() if "dola=" in line]
    assert code == 0 and len(rows) == 2 and len({line.index("dola=") for line in rows}) == 1


def test_bank_without_labels_warns(capsys, shapes_dir, tmp_path):
    from siglip_dola.loading import load
    from siglip_dola.text_bank.build import build_text_bank
    bank = build_text_bank(load(), ["red circle", "blue square"])
    np.save(tmp_path / "bank.npy", bank.embeds.numpy())
    code, out, err = run(capsys, "classify", shapes_dir, "--bank", tmp_path / "bank.npy")
    assert code == 0 and "warning: bank" in err and "stores no labels" in err


def test_odd_file_names_print_and_serialise(capsys, shapes_dir, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    png = sorted(shapes_dir.glob("*.png"))[0].read_bytes()
    names = ["sp ace.png", "new\nline.png", "ünï.png", "-dash.png"]
    for name in names:
        (folder / name).write_bytes(png)
    undecodable = bytes(folder) + b"/bad\xff.png"  # not UTF-8: a surrogate-escaped str in Python
    with open(undecodable, "wb") as handle:
        handle.write(png)
    code, out, err = run(capsys, "classify", folder, "--labels", "red circle,blue square", "--json")
    assert code == 0, err
    queries = [row["query"] for row in json.loads(out)["results"]]
    assert len(queries) == 5 and {str(folder / n) for n in names} <= set(queries)
    code, out, err = run(capsys, "classify", folder, "--labels", "red circle,blue square")
    assert code == 0 and "bad\\xff.png" in out


def test_unusual_images_are_read_as_a_viewer_shows_them(capsys, tmp_path):
    folder = tmp_path / "unusual"
    folder.mkdir()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 60000, dtype=np.uint16)).save(folder / "grey16.png")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(folder / "palette_alpha.png", transparency=0)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_pixel.png")
    code, out, err = run(capsys, "classify", folder, "--labels", "red circle,blue square", "--json")
    assert code == 0 and "Traceback" not in err
    assert len(json.loads(out)["results"]) == 4


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (3, 1), (7, 1)])
def test_thin_images_keep_their_colour_through_the_hf_processor(size):
    """A 1- or 3-pixel-high image is ambiguous to transformers 4.x's channel guess (read as channels-first)."""
    from siglip_dola.loading import load
    pixels = load().preprocess(Image.new("RGB", size, (255, 0, 0)))  # (3, 64, 64), normalised to [-1, 1]
    assert pixels.shape == (3, 64, 64) and pixels[0].min() > 0.99 and pixels[1:].max() < -0.99


def _message_texts(tree):
    """Every string of the module that is not a docstring: f-strings whole ({} for each value)."""
    docstrings, parts = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            docstrings.add(id(node.body[0].value))
        if isinstance(node, ast.JoinedStr):
            parts.update(id(value) for value in node.values)
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | parts:
            yield node.value


def test_library_messages_name_parameters_not_flags():
    """Outside cli/ a message names parameters (calibration=, image_root): a Python caller never passed a flag.
    A whole command to run may be quoted (in backquotes, or a `siglip-dola ...` line). The CLI turns parameter
    names into its flags."""
    import siglip_dola

    root = Path(siglip_dola.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "cli":
            continue
        for text in _message_texts(ast.parse(path.read_text(encoding="utf-8"))):
            if re.fullmatch(r"--[a-z-]+", text):
                continue   # a flag alone is a piece of a command line being composed (loading/borrowed.cli_flags)
            bare = re.sub(r"`[^`]*`|siglip-dola [a-z][^\n]*|var\(--", "", text)  # quoted commands, command lines, CSS
            if re.search(r"(?<![\w`-])--[a-z]", bare):
                offenders.append(f"{path.relative_to(root)}: {text[:90]!r}")
    assert not offenders, offenders


def test_the_cli_names_its_flags_for_a_library_error(tmp_path, capsys):
    from siglip_dola.settings import resolve_settings

    with pytest.raises(FileNotFoundError, match=r"calibration='.*missing.json': no such file") as error:
        resolve_settings(24, calibration=str(tmp_path / "missing.json"))
    assert "--calibration" not in str(error.value)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    code = main(["classify", str(image), "--labels", "cat,dog", "--calibration", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and f"--calibration {tmp_path / 'missing.json'}: no such file" in err
    assert "calibration=" not in err
