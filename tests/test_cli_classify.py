"""`siglip-dola classify` / `rerank` end to end on a tiny HF SiglipModel saved to a temp dir."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tools import train_embedded
from siglip_dola.cli import main

LABELS = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = train_embedded.TrainConfig(vision_layers=12, text_layers=1, hidden_size=16, num_heads=2)
    tokenizer = train_embedded.build_tokenizer()
    from transformers import SiglipModel
    model = SiglipModel(train_embedded.build_model_config(config, vocab_size=len(tokenizer))).eval()
    return train_embedded.save(model, tokenizer, tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ["a.png", "b.jpg", "sub/c.png"]:
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG but truncated")
    return folder


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def own_logits(model_dir, paths, labels):
    """The HF model's own logits_per_image with its own processor and tokenizer."""
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel
    model = SiglipModel.from_pretrained(model_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir)([Image.open(p).convert("RGB") for p in paths],
                                                           return_tensors="pt")["pixel_values"]
    ids = AutoTokenizer.from_pretrained(model_dir)(labels, padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits_per_image  # (B, C)


def test_classify_json_layout_skips_corrupt_file(capsys, model_dir, image_dir, monkeypatch):
    from siglip_dola import settings
    monkeypatch.setattr(settings, "_warned_uncalibrated", False)  # printed once per process
    code, out, err = run_cli(capsys, "classify", image_dir, "--labels", ",".join(LABELS), "--model", model_dir,
                             "--top-k", "2", "--json")
    assert code == 1  # some files were skipped
    payload = json.loads(out)
    assert list(payload) == ["settings", "results", "skipped"]
    assert payload["settings"] == {"mode": "dynamic", "layers": [10], "static_layer": None, "alpha": 0.1,
                                   "contrast_weight": 1.0, "bucket": 3, "n_buckets": 3, "calibration": None,
                                   "sources": {"mode": "default", "alpha": "default", "contrast_weight": "default",
                                               "layers": "default"}}
    assert "DoLa is uncalibrated" in err and "siglip-dola calibrate" in err
    assert [s["path"] for s in payload["skipped"]] == [str(image_dir / "broken.png")]
    assert payload["skipped"][0]["error"]
    images = [str(image_dir / n) for n in ["a.png", "b.jpg", "sub/c.png"]]
    assert [r["query"] for r in payload["results"]] == images
    for result in payload["results"]:  # the shared vocabulary of docs/output.md
        assert list(result) == ["query", "query_type", "item_type", "premature_layer", "jsd", "hits"]
        assert result["query_type"] == "image" and result["item_type"] == "label"
        assert list(result["jsd"]) == ["10"] and result["premature_layer"] == 10  # N=12: bucket 3 -> {10}
        assert len(result["hits"]) == 2 and [h["rank"] for h in result["hits"]] == [1, 2]
        assert all(list(p) == ["rank", "item", "score", "baseline_score"] for p in result["hits"])


def test_mode_off_matches_the_models_own_logits(capsys, model_dir, image_dir):
    code, out, _ = run_cli(capsys, "classify", image_dir / "*.png", image_dir / "b.jpg", "--labels",
                           ",".join(LABELS), "--model", model_dir, "--mode", "off", "--top-k", "3", "--json")
    payload = json.loads(out)
    assert code == 1 and len(payload["skipped"]) == 1
    paths = [r["query"] for r in payload["results"]]
    assert paths == sorted(paths) and len(paths) == 2  # a.png, b.jpg (the glob is not recursive)
    q_final = torch.softmax(own_logits(model_dir, paths, LABELS), dim=-1)  # the bias cancels in the softmax
    for result, expected in zip(payload["results"], q_final):
        got = {p["item"]: p["baseline_score"] for p in result["hits"]}
        assert [got[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
        assert result["hits"][0]["item"] == LABELS[int(expected.argmax())]
        assert all(p["score"] == p["baseline_score"] for p in result["hits"])
        assert result["premature_layer"] is None and result["jsd"] == {}


def test_table_output_and_clean_exit(capsys, model_dir, image_dir):
    code, out, err = run_cli(capsys, "classify", image_dir / "a.png", "--labels", ",".join(LABELS),
                             "--model", model_dir, "--mode", "static", "--layers", "4,6,8")
    assert code == 0 and "skipped" not in err  # (transformers may print its own weight-loading bar)
    assert str(image_dir / "a.png") in out and "premature layer: 6" in out and out.count("dola=") == 3


def test_templates_and_calibration_file(capsys, model_dir, image_dir, tmp_path):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"model": str(model_dir.resolve()),
                                       "choice": {"mode": "static", "layers": [2, 4, 6], "static_layer": 4}}))
    code, out, _ = run_cli(capsys, "classify", image_dir / "b.jpg", "--labels", ",".join(LABELS), "--model",
                           model_dir, "--templates", "a {}", "a photo of a {}.", "--calibration", calibration, "--json")
    (result,) = json.loads(out)["results"]
    assert code == 0 and result["premature_layer"] == 4 and list(result["jsd"]) == ["4"]


def test_rerank_both_directions(capsys, model_dir, image_dir):
    code, out, _ = run_cli(capsys, "rerank", image_dir / "a.png", image_dir / "b.jpg", "--texts",
                           ",".join(LABELS), "--model", model_dir, "--json")
    payload = json.loads(out)
    assert code == 0 and payload["skipped"] == []
    assert [sorted(p["item"] for p in r["hits"]) for r in payload["results"]] == [sorted(LABELS)] * 2
    assert {(r["query_type"], r["item_type"]) for r in payload["results"]} == {("image", "text")}
    code, out, _ = run_cli(capsys, "rerank", image_dir, "--query", "red circle", "--query", "blue square",
                           "--model", model_dir, "--layers", "2,6", "--json")
    payload = json.loads(out)
    assert code == 1 and len(payload["skipped"]) == 1
    assert [r["query"] for r in payload["results"]] == ["red circle", "blue square"]
    for result in payload["results"]:
        assert (result["query_type"], result["item_type"]) == ("text", "path")
        assert sorted(r["item"] for r in result["hits"]) == sorted(
            str(image_dir / n) for n in ["a.png", "b.jpg", "sub/c.png"])
        assert set(result["jsd"]) == {"2", "6"} and result["premature_layer"] in (2, 6)


@pytest.mark.parametrize("extra,match", [
    (["--labels", "cat,,dog"], "blank"),
    (["--labels", "cat,dog,cat"], "duplicate"),
    (["--labels", " , "], "empty"),
    ([], "--labels"),
    (["--labels", "cat", "--model", "no-such-model-name"], "unknown model"),
    (["--labels", "cat", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs the model on a CUDA device"),
])
def test_bad_arguments_exit_2(capsys, model_dir, image_dir, extra, match):
    argv = ["classify", image_dir / "a.png", *extra]
    if "--model" not in extra:
        argv += ["--model", model_dir]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and match in err and out == ""


def test_bad_label_file_and_bank(capsys, model_dir, image_dir, tmp_path):
    latin1 = tmp_path / "labels.txt"
    latin1.write_bytes("café\ncrème brûlée\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "classify", image_dir / "a.png", "--labels-file", latin1, "--model", model_dir)
    assert code == 2 and "UTF-8" in err
    bank = tmp_path / "bank.npy"
    np.save(bank, np.ones((2, 7), dtype=np.float32))
    code, _, err = run_cli(capsys, "classify", image_dir / "a.png", "--bank", bank, "--labels", "x,y",
                           "--model", model_dir)
    assert code == 2 and "dimension" in err and "16" in err
    code, _, err = run_cli(capsys, "classify", image_dir / "missing.png", "--labels", "x", "--model", model_dir)
    assert code == 2 and "missing.png" in err
