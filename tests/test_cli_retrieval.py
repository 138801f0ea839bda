"""`siglip-dola index build|add` and `siglip-dola search`: exact JSON layout, same answers as the Python API."""
import json

import numpy as np
import pytest

from siglip_dola.cli import main
from siglip_dola.retrieval import RerankConfig, open_index, search, search_captions
from tiny_index import save_tiny_siglip


@pytest.fixture(scope="module")
def cli_index(tiny_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "idx"
    first = sorted(images.glob("img_0[0-3].png"))
    assert main(["index", "build", *map(str, first), "--out", str(out), "--model", str(tiny_dir),
                 "--layers", "2,4", "--quiet"]) == 0
    assert main(["index", "add", str(out), str(images), "--quiet"]) == 1  # the rest + the broken file (skipped)
    return out


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_build_and_add_report_counts_and_skipped(cli_index, images, capsys):
    manifest = json.loads((cli_index / "manifest.json").read_text())
    assert manifest["count"] == 7 and manifest["layers"] == [2, 4]
    assert [path for path, _ in manifest["skipped"]] == [str((images / "broken.png").resolve())]
    assert main(["index", "add", str(cli_index), str(images / "img_00.png"), "--quiet"]) == 0  # nothing skipped
    out, err = capsys.readouterr()
    assert "7 images" in out and "0 skipped" in out and "broken" not in out + err
    # the one exit-code rule: skipped files go to stderr, and exit 1 says some were skipped
    assert main(["index", "add", str(cli_index), str(images), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "1 skipped" in out and "broken.png" not in out
    assert f"skipped {(images / 'broken.png').resolve()}: " in err


def test_search_json_layout_is_exact_and_matches_the_api(cli_index, model, capsys):
    out = run_json(capsys, ["search", str(cli_index), "a red circle", "--top-k", "3", "--rerank-k", "6", "--json"])
    assert list(out) == ["settings", "results", "skipped"] and out["skipped"] == []
    assert out["settings"]["layers"] == [2, 4] and out["settings"]["mode"] == "dynamic"
    (row,) = out["results"]  # the shared vocabulary of docs/output.md
    assert list(row) == ["query", "query_type", "item_type", "premature_layer", "jsd", "hits"]
    assert row["query"] == "a red circle" and row["premature_layer"] in (2, 4) and len(row["hits"]) == 3
    assert (row["query_type"], row["item_type"]) == ("text", "path")
    for rank, hit in enumerate(row["hits"], 1):
        assert list(hit) == ["rank", "item", "score", "baseline_score", "rank_baseline"] and hit["rank"] == rank
        assert isinstance(hit["item"], str) and isinstance(hit["rank_baseline"], int)
        assert isinstance(hit["score"], float) and isinstance(hit["baseline_score"], float)
    api = search(open_index(cli_index), "a red circle", model, RerankConfig(top_k=3, rerank_k=6))
    assert row == json.loads(json.dumps(api.to_json()))


def test_search_baseline_is_the_softmax_of_cosines(cli_index, model, capsys):
    out = run_json(capsys, ["search", str(cli_index), "a blue square", "--mode", "off", "--top-k", "7",
                            "--rerank-k", "7", "--json"])
    (out,) = out["results"]
    assert out["premature_layer"] is None
    index = open_index(cli_index)
    text = model.encode_text(["a blue square"])[0].double().numpy()
    # the exact first stage's own fp16 codes (the int8 layer store's final row only serves an approximate one)
    final = index.faiss_index.reconstruct_n(0, len(index)).astype(np.float64)  # (n, D)
    logits = final @ (text / np.linalg.norm(text)) / model.tau
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-logits, kind="stable")
    assert [h["item"] for h in out["hits"]] == [index.paths[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in out["hits"]], probs[order], rtol=1e-4)


def test_search_table(cli_index, capsys):
    assert main(["search", str(cli_index), "a green triangle", "--top-k", "2", "--mode", "static"]) == 0
    printed = capsys.readouterr().out
    assert "premature layer: 4" in printed and printed.count("img_") == 2  # static default: middle of [2, 4]


def test_captions_search(model, images, tiny_dir, tmp_path, capsys):
    captions = tmp_path / "captions.csv"
    captions.write_text("id,caption\n1,a red circle\n2,a blue square\n3,a green triangle\n", encoding="utf-8")
    out = run_json(capsys, ["search", "--captions", str(captions), "--image", str(images / "img_01.png"),
                            "--model", str(tiny_dir), "--bucket", "2", "--top-k", "2", "--rerank-k", "3", "--json"])
    (row,) = out["results"]
    assert (row["query_type"], row["item_type"]) == ("image", "caption")
    assert list(row["hits"][0]) == ["rank", "item", "score", "baseline_score", "rank_baseline"]
    api = search_captions(model, images / "img_01.png", captions, RerankConfig(top_k=2, rerank_k=3), bucket=2)
    assert row == json.loads(json.dumps(api.to_json()))


def test_mismatch_and_bad_arguments_exit_2(cli_index, tmp_path, images, capsys):
    other = save_tiny_siglip(tmp_path / "other", seed=1)
    assert main(["search", str(cli_index), "a red car", "--model", str(other)]) == 2
    assert "was built with model" in capsys.readouterr().err
    assert main(["index", "add", str(cli_index), str(images), "--model", str(other)]) == 2
    assert "was built with model" in capsys.readouterr().err
    assert main(["search", str(cli_index), "a red car", "--layers", "3"]) == 2
    assert "stores layers [2, 4]" in capsys.readouterr().err
    assert main(["search", str(cli_index)]) == 2
    assert "give INDEX and QUERY" in capsys.readouterr().err
    assert main(["search", str(cli_index), "x", "--top-k", "5", "--rerank-k", "2"]) == 2
    assert "--rerank-k (2) must be >= --top-k (5)" in capsys.readouterr().err
