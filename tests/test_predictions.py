"""`eval --predictions`: per-image rows vs naive float64 loops from the model's own modules; atomic writes."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from siglip_dola.cli import main
from siglip_dola.data import shapes
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.evaluation.predictions import write_predictions
from tools import train_embedded as te
from naive_dola import N_IMAGES, NUM_LAYERS, naive_ranking


@pytest.fixture(scope="module")
def rows(tiny_loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("predictions") / "p.jsonl"
    report = evaluate(tiny_loaded, "shapes", split="test", n=N_IMAGES, predictions=path, progress=False)
    assert report["predictions"] == str(path)
    return [json.loads(line) for line in path.read_text().splitlines()], report


def _naive_dola_probs(q_image, premature, alpha):
    """{class: p_hat} over the head set: softmax of log q_N - log q_M."""
    q_final = q_image[NUM_LAYERS]
    head = [c for c in range(len(q_final)) if q_final[c] >= alpha * q_final.max()]
    contrast = np.array([math.log(q_final[c]) - math.log(q_image[premature][c]) for c in head])
    e = np.exp(contrast - contrast.max())
    return dict(zip(head, e / e.sum()))


def test_rows_match_naive_loops(rows, naive):
    rows, report = rows
    q, labels = naive
    samples = shapes.make_split("test", n=N_IMAGES)
    assert [r["index"] for r in rows] == list(range(N_IMAGES))
    assert [r["id"] for r in rows] == [s.name for s in samples]
    for i, row in enumerate(rows):
        assert row["label_index"] == labels[i] and row["label"] == shapes.CLASSNAMES[labels[i]]
        off = row["modes"]["off"]
        q_final = q[i][NUM_LAYERS]
        assert [e["index"] for e in off["top5"]] == naive_ranking(q[i], "off", [], 0.1)[0][:5]
        assert [e["prob"] for e in off["top5"]] == pytest.approx([q_final[e["index"]] for e in off["top5"]], abs=1e-6)
        assert off["true_prob"] == pytest.approx(q_final[labels[i]], abs=1e-6)
        assert "premature_layer" not in off
        for mode in ("static", "dynamic"):
            entry, layers = row["modes"][mode], report["modes"][mode]["settings"]["layers"]
            ranking, premature = naive_ranking(q[i], mode, layers, 0.1)
            assert [e["index"] for e in entry["top5"]] == ranking[:5]
            assert [e["label"] for e in entry["top5"]] == [shapes.CLASSNAMES[c] for c in ranking[:5]]
            assert entry["premature_layer"] == premature
            p_hat = _naive_dola_probs(q[i], premature, 0.1)
            assert entry["head_set_size"] == len(p_hat)
            assert entry["true_prob"] == pytest.approx(p_hat.get(labels[i], 0.0), abs=1e-5)
            assert [e["prob"] for e in entry["top5"]] == pytest.approx([p_hat.get(c, 0.0) for c in ranking[:5]], abs=1e-5)
            expected_jsd = {str(j): jensenshannon(q_final, q[i][j]) ** 2 for j in layers}
            assert entry["jsd"].keys() == expected_jsd.keys()
            for j, value in expected_jsd.items():
                assert entry["jsd"][j] == pytest.approx(value, rel=1e-4, abs=1e-9)


def test_retrieval_rows_are_text_to_image_rankings(tiny_hf_siglip, tiny_loaded, tmp_path):
    n = 12
    path = tmp_path / "r.jsonl"
    evaluate(tiny_loaded, "shapes", split="test", n=n, task="zeroshot_retrieval", predictions=path, progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    samples = shapes.make_split("test", n=n)
    with torch.no_grad():
        images = tiny_hf_siglip.vision_model(pixel_values=te.pixels_from_images([s.image for s in samples])).pooler_output
        texts = tiny_loaded.encode_text([s.caption for s in samples])
    similarity = (torch.nn.functional.normalize(texts.double(), dim=-1)
                  @ torch.nn.functional.normalize(images.double(), dim=-1).T)  # (T, I)
    assert [r["query"] for r in rows] == [s.caption for s in samples]
    for t, row in enumerate(rows):
        assert row["index"] == t and row["gold"] == [samples[t].name]
        expected = [samples[i].name for i in torch.argsort(similarity[t], descending=True)[:10].tolist()]
        assert [e["id"] for e in row["modes"]["off"]["top10"]] == expected
        probs = torch.softmax(similarity[t] / tiny_loaded.tau, dim=-1)
        assert row["modes"]["off"]["top10"][0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert row["modes"]["dynamic"]["premature_layer"] in range(1, NUM_LAYERS)


def test_write_is_atomic_and_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "p.jsonl"
    write_predictions(path, [{"index": 0}, {"index": 1}])
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'
    with pytest.raises(ValueError):
        write_predictions(path, [{"index": 0}, {"index": float("nan")}])  # not JSON: the old file stays
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_cli_eval_writes_predictions(tmp_path, capsys):
    out, predictions = tmp_path / "r.json", tmp_path / "p.jsonl"
    assert main(["eval", "--dataset", "shapes", "--split", "test", "--limit", "12", "--no-progress",
                 "--out", str(out), "--predictions", str(predictions), "--n-resamples", "500"]) == 0
    line = capsys.readouterr().out
    assert "chosen " in line and "[" in line and "p=" in line  # deltas with intervals and McNemar p
    report = json.loads(out.read_text())
    assert report["predictions"] == str(predictions) and report["paired"]["static"]["n_resamples"] == 500
    assert len(predictions.read_text().splitlines()) == 12
