"""`siglip-dola report` / `write_report`: the HTML report, checked as data and in headless Chromium.

Fixtures follow the Result JSON and Predictions JSONL contracts of docs/viewer.md exactly; their
expected outcomes are decided while they are built, independently of the report's own code.
"""
import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from siglip_dola.cli import main
from siglip_dola.data import shapes
from siglip_dola.viewer import write_report
from browser import Chromium

OUTCOME_PLAN = ["fixed"] * 5 + ["broken"] * 3 + ["both right"] * 10 + ["both wrong"] * 12  # 30 rows


def _distribution(rng, n_classes, top):
    """A probability vector [C] whose argmax is `top`."""
    p = rng.dirichlet(np.ones(n_classes) * 0.3)
    p[top] = p.max() + 0.05
    return p / p.sum()


def _top5(p):
    order = np.argsort(-p, kind="stable")[:5]
    return [{"label": shapes.CLASSNAMES[i], "index": int(i), "prob": float(p[i])} for i in order]


def classification_records(ids, plan, seed=0):
    """Predictions JSONL records (contract layout) whose off / dynamic top-1 follow `plan`."""
    rng = np.random.default_rng(seed)
    n_classes = len(shapes.CLASSNAMES)
    records = []
    for i, (item_id, outcome) in enumerate(zip(ids, plan)):
        label = i % n_classes
        wrong = (label + 1 + int(rng.integers(n_classes - 1))) % n_classes
        off_right = outcome in ("broken", "both right")
        dola_right = outcome in ("fixed", "both right")
        off = _distribution(rng, n_classes, label if off_right else wrong)
        dyn = _distribution(rng, n_classes, label if dola_right else wrong)
        sta = _distribution(rng, n_classes, label)
        jsd = {str(j): float(rng.uniform(0, 0.5)) for j in (2, 4, 6, 8)}
        layer = int(max(jsd, key=jsd.get))
        records.append({"index": i, "id": item_id, "label": shapes.CLASSNAMES[label], "label_index": label,
                        "modes": {"off": {"top5": _top5(off), "true_prob": float(off[label])},
                                  "static": {"top5": _top5(sta), "true_prob": float(sta[label]),
                                             "premature_layer": 2, "head_set_size": int(rng.integers(1, 9)),
                                             "jsd": {"2": jsd["2"]}},
                                  "dynamic": {"top5": _top5(dyn), "true_prob": float(dyn[label]),
                                              "premature_layer": layer, "head_set_size": int(rng.integers(1, 9)),
                                              "jsd": jsd}}})
    return records


def _settings(mode, layers, static_layer=None):
    return {"mode": mode, "layers": layers, "static_layer": static_layer, "alpha": None if mode == "off" else 0.1,
            "contrast_weight": 1.0, "bucket": None, "n_buckets": None,
            "sources": {"mode": "flag", "layers": "default", "alpha": "default", "contrast_weight": "default"},
            "calibration": None}


def classification_result(records, predictions_path):
    """A Result JSON (contract layout) for `records`."""
    n = len(records)
    acc = {m: sum(r["modes"][m]["top5"][0]["index"] == r["label_index"] for r in records) / n
           for m in ("off", "static", "dynamic")}
    def paired(mode):
        fixed = sum(r["modes"]["off"]["top5"][0]["index"] != r["label_index"] == r["modes"][mode]["top5"][0]["index"]
                    for r in records)
        broken = sum(r["modes"][mode]["top5"][0]["index"] != r["label_index"] == r["modes"]["off"]["top5"][0]["index"]
                     for r in records)
        delta = acc[mode] - acc["off"]
        return {"metric": "acc1", "off": acc["off"], "value": acc[mode], "delta": delta, "ci_low": delta - 0.05,
                "ci_high": delta + 0.05, "confidence": 0.95, "mcnemar_p": 0.5, "fixed": fixed, "broken": broken,
                "n": n, "n_resamples": 10000, "seed": 0}
    modes = {m: {"settings": _settings(m, [] if m == "off" else [2, 4, 6, 8] if m == "dynamic" else [2],
                                       2 if m == "static" else None),
                 "metrics": {"acc1": acc[m], "acc5": 1.0, "mean_per_class_recall": acc[m]}} for m in acc}
    return {"dataset": "shapes", "model": "embedded", "pretrained": None, "task": "zeroshot_classification",
            "language": "en", "metrics": modes["dynamic"]["metrics"], "split": "test", "n_images": n,
            "chosen_mode": "dynamic", "settings": modes["dynamic"]["settings"], "modes": modes,
            "paired": {"static": paired("static"), "dynamic": paired("dynamic")},
            "reference": {"best_single_layer": {"layer": 12, "metrics": {"acc1": 0.31}, "paired": {},
                                                "note": "a single layer read out alone; not DoLa"}},
            "layer_lens": {"metric": "acc1", "layers": list(range(1, 25)), "top1": [0.1 + 0.01 * j for j in range(24)],
                           "baseline_top1": 0.33, "dynamic_layer_counts": {"2": 10, "4": 8, "6": 7, "8": 5},
                           "jsd_layers": list(range(1, 24)), "mean_jsd": [0.5 - 0.02 * j for j in range(23)]},
            "predictions": str(predictions_path), "skipped": []}


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")


@pytest.fixture(scope="module")
def classification_files(tmp_path_factory):
    """30 rows: 26 image files, 3 shapes dataset ids (thumbnails from the dataset), 1 id found nowhere."""
    root = tmp_path_factory.mktemp("report")
    ids = []
    for i in range(26):
        path = root / f"img_{i:02d}.png"
        shapes.make_sample("test", i).image.save(path)
        ids.append(str(path))
    ids += ["test_0_00026", "test_0_00027", "test_0_00028", str(root / "gone.png")]
    records = classification_records(ids, OUTCOME_PLAN)
    predictions = root / "predictions.jsonl"
    write_jsonl(predictions, records, extra_lines=["{not json", '{"index": 99}'])
    result = root / "result.json"
    result.write_text(json.dumps(classification_result(records, predictions)))
    return result, predictions, records


def embedded_data(html):
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))
