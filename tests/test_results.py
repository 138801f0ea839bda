"""The result JSON against clip_benchmark itself: its own key names, its own metrics code, its own `build`."""
import ast
import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from siglip_dola.cli import main
from siglip_dola.data import shapes
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.evaluation.results import build_table
from tools import train_embedded as te

N_IMAGES = 40
CLIP_BENCHMARK = Path(importlib.util.find_spec("clip_benchmark").origin).parent


def _dump_keys() -> set[str]:
    """The keys of the `dump = {...}` dict that clip_benchmark's cli.py writes as its result JSON."""
    tree = ast.parse((CLIP_BENCHMARK / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "dump":
            return {key.value for key in node.value.keys}
    raise AssertionError("clip_benchmark's cli.py has no `dump = {...}`")


def _retrieval_prefixes() -> set[str]:
    source = (CLIP_BENCHMARK / "metrics" / "zeroshot_retrieval.py").read_text()
    return set(re.findall(r'metrics\[f"(\w+_recall)@\{recall_k\}"\]', source))


@pytest.fixture(scope="module")
def classification(tiny_loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "classification.json"
    evaluate(tiny_loaded, "shapes", split="test", n=N_IMAGES, out=out, progress=False)
    return out, json.loads(out.read_text())


class _ClipLike(torch.nn.Module):
    """The tiny SigLIP behind clip_benchmark's model interface: HF's own image tower; the "tokenizer" hands
    strings to the loaded model's text encoder by index."""

    def __init__(self, hf_model, loaded):
        super().__init__()
        self.hf_model, self.loaded, self.texts = hf_model, loaded, []

    def tokenize(self, texts):
        self.texts = list(texts)
        return torch.arange(len(self.texts))

    def encode_image(self, pixels):
        return self.hf_model.vision_model(pixel_values=pixels).pooler_output

    def encode_text(self, indices):
        return self.loaded.encode_text([self.texts[i] for i in indices.tolist()])


def test_top_level_keys_are_clip_benchmarks(classification):
    _, report = classification
    assert _dump_keys() == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert _dump_keys() <= set(report)
    assert (report["task"], report["language"], report["pretrained"]) == ("zeroshot_classification", "en", "tiny")
    assert set(report["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    for mode in ("off", "static", "dynamic"):
        assert set(report["modes"][mode]["metrics"]) == set(report["metrics"])


def _classification_return_keys() -> set[str]:
    """The keys of the single-label metrics dict clip_benchmark's zeroshot_classification.evaluate returns."""
    tree = ast.parse((CLIP_BENCHMARK / "metrics" / "zeroshot_classification.py").read_text())
    evaluate_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "evaluate")
    returns = [n.value for n in ast.walk(evaluate_fn) if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict)]
    return {key.value for key in max(returns, key=lambda d: len(d.keys)).keys}


def test_metrics_equal_clip_benchmarks_own_zero_shot_code(tiny_hf_siglip, tiny_loaded, classification):
    from clip_benchmark.metrics import zeroshot_classification
    from sklearn.metrics import balanced_accuracy_score

    _, report = classification
    assert _classification_return_keys() == set(report["metrics"])
    samples = shapes.make_split("test", n=N_IMAGES)
    data = torch.utils.data.TensorDataset(te.pixels_from_images([s.image for s in samples]),
                                          torch.tensor([s.label for s in samples]))
    clip_like = _ClipLike(tiny_hf_siglip, tiny_loaded)
    # clip_benchmark's own classifier and logits (its `accuracy` helper breaks on numpy 2: float() of a
    # 1-element array), then its metric definitions: top-k hit rate and sklearn's balanced accuracy
    with torch.no_grad():
        classifier = zeroshot_classification.zero_shot_classifier(
            clip_like, clip_like.tokenize, shapes.CLASSNAMES, [t.replace("{}", "{c}") for t in shapes.TEMPLATES],
            "cpu", amp=False)
        logits, target = zeroshot_classification.run_classification(
            clip_like, classifier, torch.utils.data.DataLoader(data, batch_size=16), "cpu", amp=False)
    top5 = logits.topk(5, dim=1).indices
    theirs = {"acc1": float((top5[:, 0] == target).float().mean()),
              "acc5": float((top5 == target[:, None]).any(dim=1).float().mean()),
              "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(dim=1))}
    assert report["chosen_mode"] == "off"  # uncalibrated: the baseline is what `metrics` reports
    for key, value in theirs.items():
        assert report["metrics"][key] == pytest.approx(float(value), abs=1e-6), key


def test_retrieval_keys_and_values_equal_clip_benchmarks(tiny_hf_siglip, tiny_loaded):
    from clip_benchmark.metrics import zeroshot_retrieval

    n = 20
    report = evaluate(tiny_loaded, "shapes", split="test", n=n, task="zeroshot_retrieval", progress=False)
    assert set(report["metrics"]) == {f"{p}@{k}" for p in _retrieval_prefixes() for k in (1, 5, 10)}
    samples = shapes.make_split("test", n=n)
    pixels = te.pixels_from_images([s.image for s in samples])
    batches = [(pixels[i:i + 8], [[s.caption] for s in samples[i:i + 8]]) for i in range(0, n, 8)]
    clip_like = _ClipLike(tiny_hf_siglip, tiny_loaded)
    with torch.no_grad():
        theirs = zeroshot_retrieval.evaluate(clip_like, batches, clip_like.tokenize, "cpu", amp=False,
                                             recall_k_list=[1, 5, 10])
    for key, value in theirs.items():
        assert report["metrics"][key] == pytest.approx(float(value), abs=1e-6), key


def test_clip_benchmarks_own_build_reads_our_json(classification, tmp_path):
    from clip_benchmark import cli as clip_cli

    path, report = classification
    out = tmp_path / "theirs.csv"
    clip_cli.main_build(type("Args", (), {"files": [str(path)], "output": str(out)})())
    (row,) = list(csv.DictReader(out.open()))
    assert float(row["acc1"]) == pytest.approx(report["metrics"]["acc1"])
    assert row["model_fullname"] == "tiny tiny" and row["task"] == "zeroshot_classification"


def test_build_aggregates_ours_and_clip_benchmarks_results_and_skips_bad_files(classification, tmp_path, capsys):
    path, report = classification
    theirs = tmp_path / "clip_benchmark.json"
    theirs.write_text(json.dumps({"dataset": "cifar10", "model": "ViT-B-32", "pretrained": "openai",
                                  "task": "zeroshot_classification", "metrics": {"acc1": 0.9}, "language": "en"}))
    (tmp_path / "broken.json").write_text("{not json")
    out = tmp_path / "table.csv"
    assert main(["build", str(path), str(tmp_path), "--out", str(out)]) == 1  # a skipped file is reported
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.json" in captured.err and "2 result file(s)" in captured.out
    rows = {r["model"]: r for r in csv.DictReader(out.open())}
    ours = rows["tiny"]
    assert list(ours)[:4] == ["dataset", "model", "pretrained", "model_fullname"]
    assert float(ours["acc1"]) == pytest.approx(report["metrics"]["acc1"])
    assert float(ours["modes.static.metrics.acc1"]) == pytest.approx(report["modes"]["static"]["metrics"]["acc1"])
    assert float(ours["paired.dynamic.ci_low"]) == pytest.approx(report["paired"]["dynamic"]["ci_low"])
    assert json.loads(ours["settings.layers"]) == report["settings"]["layers"]
    assert rows["ViT-B-32"]["acc1"] == "0.9" and rows["ViT-B-32"]["paired.dynamic.delta"] == ""
    with pytest.raises(ValueError, match="no result JSON"):
        build_table([tmp_path / "broken.json"], tmp_path / "none.csv")
