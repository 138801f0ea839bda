"""Calibration: grid, tie rules, every grid score vs a naive per-image loop (scipy JSD), one model pass, JSON."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from siglip_dola.data import shapes
from tools import train_embedded as te
from conftest import CountingReadout
from siglip_dola.evaluation.calibrate import CalibrationGrid, calibrate, choose, grid_points
from siglip_dola.modes import CONTRASTING, MODES
from siglip_dola.data.datasets import shapes_dataset
from siglip_dola.scorer import DoLaSigLIP
from siglip_dola.text_bank.build import build_text_bank

NUM_LAYERS, N_IMAGES, BATCH = 12, 36, 16

PER_BUCKET = sum(not MODES[name].fixed_layer for name in CONTRASTING)   # modes the grid searches per bucket
PER_LAYER = sum(MODES[name].fixed_layer for name in CONTRASTING)        # ... per static layer

def test_grid_for_vit_l_16():
    points = [p.to_json() for p in grid_points(CalibrationGrid(), 24)]   # DoLaSettings, as results store them
    dynamic = {(p["n_buckets"], p["bucket"]): p["layers"] for p in points if p["mode"] == "dynamic"}
    assert dynamic == {(2, 1): [2, 4, 6, 8, 10, 12], (2, 2): [14, 16, 18, 20, 22],
                       (3, 1): [2, 4, 6, 8], (3, 2): [10, 12, 14, 16], (3, 3): [18, 20, 22],
                       (4, 1): [2, 4, 6], (4, 2): [8, 10, 12], (4, 3): [14, 16, 18], (4, 4): [20, 22]}
    static = sorted({p["static_layer"] for p in points if p["mode"] == "static"})
    assert static == list(range(2, 24, 2))
    assert points[0]["mode"] == "off" and sum(p["mode"] == "off" for p in points) == 1
    # the baseline + alphas x contrast weights x (buckets per bucket mode + static layers per fixed-layer mode)
    assert len(points) == 1 + 3 * 3 * (9 * PER_BUCKET + 11 * PER_LAYER)
    weights = [p["contrast_weight"] for p in points if p["mode"] == "dynamic"]
    assert sorted(set(weights)) == [0.25, 0.5, 1.0] and weights[0] == 1.0  # lambda = 1 first: it wins ties
    all_static = grid_points(CalibrationGrid(static_parity="all", alphas=(0.1,), contrast_weights=(1.0,)), 24)
    assert sorted(p.static_layer for p in all_static if p.mode == "static") == list(range(1, 24))


def _scored(mode, correct, layers):
    return {"mode": mode, "correct": correct, "layers": layers}


def test_choice_ties_go_to_baseline_then_fewer_layers():
    off, static = _scored("off", 5, []), _scored("static", 5, [4])
    dynamic3, dynamic2 = _scored("dynamic", 5, [2, 4, 6]), _scored("dynamic", 5, [8, 10])
    assert choose([dynamic3, static, off]) is off
    assert choose([dynamic3, dynamic2, static]) is static
    assert choose([dynamic3, dynamic2]) is dynamic2
    better = _scored("dynamic", 6, [2, 4, 6])
    assert choose([off, static, better]) is better
    first, second = _scored("static", 5, [2]), _scored("static", 5, [4])
    assert choose([first, second]) is first  # full tie: the earlier grid point


def naive_layer_embeds(tiny_hf_siglip, images):
    """{layer j: z_j [n, D]} for j = 1..N through the model's own post-layernorm + MAP head."""
    vision = tiny_hf_siglip.vision_model
    with torch.no_grad():
        out = vision(pixel_values=te.pixels_from_images(images), output_hidden_states=True)
        return {j: vision.head(vision.post_layernorm(out.hidden_states[j])).double().numpy()
                for j in range(1, NUM_LAYERS + 1)}


def naive_probs(z, bank, tau):
    logits = (bank / np.linalg.norm(bank, axis=1, keepdims=True)) @ (z / np.linalg.norm(z)) / tau
    e = np.exp(logits - logits.max())
    return e / e.sum()


def naive_prediction(q, point):
    """Predicted class for one image from {layer: q_j}, with plain numpy and scipy's JSD."""
    q_final = q[NUM_LAYERS]
    if point["mode"] == "off":
        return int(np.argmax(q_final))
    if point["mode"] == "static":
        premature = point["static_layer"]
    elif point["mode"] == "dynamic":
        divergences = [jensenshannon(q_final, q[j]) ** 2 for j in point["layers"]]
        premature = point["layers"][int(np.argmax(divergences))]
    else:
        raise NotImplementedError(f"no naive reference for mode {point['mode']!r}: add its math here")
    keep = q_final >= point["alpha"] * q_final.max()
    contrast = np.where(keep, np.log(q_final) - point["contrast_weight"] * np.log(q[premature]), -np.inf)
    return int(np.argmax(contrast))


@pytest.mark.parametrize("chunk_floor", [1 << 22, 1])  # one chunk; chunks of 3 rows (36 // 11 layers)
def test_every_grid_score_matches_naive_loop_and_model_runs_once(tiny_hf_siglip, tiny_loaded, tmp_path, monkeypatch,
                                                                 chunk_floor):
    from siglip_dola.evaluation import layer_logits
    monkeypatch.setattr(layer_logits, "CHUNK_FLOOR", chunk_floor)
    counting = dataclasses.replace(tiny_loaded, readout=CountingReadout(tiny_loaded.readout))
    out = tmp_path / "calib.json"
    report = calibrate(counting, "shapes", split="val", n=N_IMAGES, batch_size=BATCH, out=out, progress=False)
    assert counting.readout.calls == math.ceil(N_IMAGES / BATCH)  # one pass, never re-run per grid point

    samples = shapes.make_split("val", n=N_IMAGES)
    bank = build_text_bank(tiny_loaded, shapes.CLASSNAMES, shapes.TEMPLATES).embeds.double().numpy()
    z = naive_layer_embeds(tiny_hf_siglip, [s.image for s in samples])
    q = [{j: naive_probs(z[j][i], bank, tiny_loaded.tau) for j in z} for i in range(N_IMAGES)]
    labels = [s.label for s in samples]
    assert len(report["scores"]) == len(grid_points(CalibrationGrid(), NUM_LAYERS)) == 1 + 3 * 3 * (9 * PER_BUCKET + 5 * PER_LAYER)
    for score in report["scores"]:
        correct = sum(naive_prediction(q[i], score) == labels[i] for i in range(N_IMAGES))
        assert score["correct1"] == correct, score
        assert score["acc1"] == pytest.approx(correct / N_IMAGES)
    best = max(s["correct1"] for s in report["scores"])
    assert report["choice_metrics"]["acc1"] == pytest.approx(best / N_IMAGES)
    alone = {j: sum(int(np.argmax(q[i][j])) == labels[i] for i in range(N_IMAGES)) for j in range(1, NUM_LAYERS)}
    top = max(alone.values())
    assert report["best_single_layer"] == {"layer": max(j for j in alone if alone[j] == top),  # ties: deeper
                                           "acc1": pytest.approx(top / N_IMAGES)}

    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["model"] == "tiny" and written["dataset"] == "shapes" and written["split"] == "val"
    assert written["grid"] == {"n_buckets": [2, 3, 4], "parity": "even", "static_parity": "even",
                               "alphas": [0.05, 0.1, 0.2], "contrast_weights": [1.0, 0.5, 0.25]}
    scorer = DoLaSigLIP.from_calibration(out, tiny_loaded)
    choice = written["choice"]
    assert scorer.settings.mode == choice["mode"] and scorer.settings.alpha == pytest.approx(choice.get("alpha", 0.1))
    assert scorer.settings.contrast_weight == choice.get("contrast_weight", 1.0)
    assert scorer.settings.sources["mode"] == "calibration" and scorer.settings.calibration == str(out)
    chosen = next(s for s in report["scores"] if s["correct1"] == best)
    if choice["mode"] != "off":
        assert scorer.settings.layers == chosen["layers"]


def test_calibrate_accepts_a_dataset_object_and_custom_grid(tiny_loaded):
    dataset = shapes_dataset("val", n=12)
    grid = CalibrationGrid(n_buckets=(3,), alphas=(0.1,), static_parity="all", contrast_weights=(1.0,))
    report = calibrate(tiny_loaded, dataset, grid=grid, progress=False)
    assert report["n_images"] == 12
    assert len(report["scores"]) == 1 + 3 * PER_BUCKET + (NUM_LAYERS - 1) * PER_LAYER
    assert report["grid"]["n_buckets"] == (3,)


def test_interrupted_calibration_leaves_no_file(tiny_loaded, tmp_path):
    out = tmp_path / "calib.json"
    out.write_text("previous complete file")
    interrupted = dataclasses.replace(tiny_loaded, readout=CountingReadout(tiny_loaded.readout, fail_at=2))
    with pytest.raises(KeyboardInterrupt):
        calibrate(interrupted, "shapes", split="val", n=24, batch_size=8, out=out, progress=False)
    assert out.read_text() == "previous complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json"]


@pytest.mark.parametrize("text,match", [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object"),
                                        ('{"model": "m"}', "lacks keys")])
def test_read_calibration_names_the_bad_file(tmp_path, text, match):
    from siglip_dola.evaluation.calibrate import read_calibration

    path = tmp_path / "cal.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_calibration(path)
    assert str(path)[:150] in str(err.value)
