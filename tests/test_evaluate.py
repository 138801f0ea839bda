"""Evaluation: metrics per mode and layer lens vs naive loops from the model's own modules; refusals; retrieval."""
import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from siglip_dola.evaluation import metrics
from siglip_dola import scoring
from siglip_dola.data import shapes
from tools import train_embedded as te
from siglip_dola.evaluation.calibrate import calibrate
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.evaluation.results import summary_line
from siglip_dola.modes import MODES
from siglip_dola.text_bank.build import build_text_bank

from naive_dola import N_IMAGES, NUM_LAYERS, naive_ranking


@pytest.fixture(scope="module")
def report(tiny_loaded):
    return evaluate(tiny_loaded, "shapes", split="test", n=N_IMAGES, progress=False)


def test_default_modes_match_naive_loops(report, naive):
    q, labels = naive
    assert report["modes"]["dynamic"]["settings"]["layers"] == [10]  # last of 3 buckets of 12 layers, even, N excluded
    assert report["modes"]["static"]["settings"]["static_layer"] == 10
    for mode in ("off", "static", "dynamic"):
        layers = report["modes"][mode]["settings"]["layers"]
        rankings = [naive_ranking(q[i], mode, layers, 0.1)[0] for i in range(N_IMAGES)]
        acc1 = np.mean([r[0] == y for r, y in zip(rankings, labels)])
        acc5 = np.mean([y in r[:5] for r, y in zip(rankings, labels)])
        recalls = [np.mean([rankings[i][0] == c for i in np.flatnonzero(labels == c)]) for c in np.unique(labels)]
        assert report["modes"][mode]["metrics"]["acc1"] == pytest.approx(acc1)
        assert report["modes"][mode]["metrics"]["acc5"] == pytest.approx(acc5)
        assert report["modes"][mode]["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean(recalls))


def test_layer_lens_matches_naive(report, naive):
    q, labels = naive
    lens = report["layer_lens"]
    assert lens["layers"] == list(range(1, NUM_LAYERS + 1)) and lens["jsd_layers"] == list(range(1, NUM_LAYERS))
    for j in range(1, NUM_LAYERS + 1):
        top1 = np.mean([np.argmax(q[i][j]) == labels[i] for i in range(N_IMAGES)])
        assert lens["top1"][j - 1] == pytest.approx(top1)
    assert lens["baseline_top1"] == pytest.approx(report["modes"]["off"]["metrics"]["acc1"])
    for j in range(1, NUM_LAYERS):
        mean_jsd = np.mean([jensenshannon(q[i][NUM_LAYERS], q[i][j]) ** 2 for i in range(N_IMAGES)])
        assert lens["mean_jsd"][j - 1] == pytest.approx(mean_jsd, rel=1e-4, abs=1e-9)
    assert lens["dynamic_layer_counts"] == {"10": N_IMAGES}


def test_calibrated_eval_uses_calibration_and_refuses_its_split(tiny_loaded, naive, tmp_path):
    calibration = calibrate(tiny_loaded, "shapes", split="val", n=24, out=tmp_path / "calib.json", progress=False)
    out = tmp_path / "result.json"
    result = evaluate(tiny_loaded, "shapes", split="test", n=N_IMAGES, calibration=tmp_path / "calib.json",
                      out=out, progress=False)
    dynamic = calibration["best"]["dynamic"]
    assert result["modes"]["dynamic"]["settings"]["bucket"] == dynamic["bucket"]
    assert result["modes"]["dynamic"]["settings"]["alpha"] == dynamic["alpha"]
    assert result["modes"]["static"]["settings"]["static_layer"] == calibration["best"]["static"]["static_layer"]
    q, labels = naive
    point = result["modes"]["dynamic"]["settings"]
    acc1 = np.mean([naive_ranking(q[i], "dynamic", point["layers"], point["alpha"])[0][0] == labels[i]
                    for i in range(N_IMAGES)])
    assert result["modes"]["dynamic"]["metrics"]["acc1"] == pytest.approx(acc1)
    written = json.loads(out.read_text())
    chosen = calibration["choice"]["mode"]
    assert written["chosen_mode"] == chosen and written["metrics"] == written["modes"][chosen]["metrics"]
    assert written["settings"]["calibration"] == str(tmp_path / "calib.json")
    assert written["settings"]["sources"]["mode"] == "calibration"
    assert summary_line(written).startswith("shapes [test, n=40] zeroshot_classification acc1: off=")

    with pytest.raises(ValueError, match="split 'val'.*the split being evaluated"):
        evaluate(tiny_loaded, "shapes", split="val", n=12, calibration=tmp_path / "calib.json", progress=False)
    other = dict(calibration, model="someone-else")
    with pytest.raises(ValueError, match="someone-else"):
        evaluate(tiny_loaded, "shapes", split="test", n=12, calibration=other, progress=False)


def test_retrieval_recall_matches_naive(tiny_hf_siglip, tiny_loaded):
    n = 20
    result = evaluate(tiny_loaded, "shapes", split="test", n=n, task="zeroshot_retrieval", progress=False)
    samples = shapes.make_split("test", n=n)
    with torch.no_grad():
        images = tiny_hf_siglip.vision_model(pixel_values=te.pixels_from_images([s.image for s in samples])).pooler_output
        texts = tiny_loaded.encode_text([s.caption for s in samples])
    similarity = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    for k in (1, 5, 10):
        i2t = np.mean([i in torch.argsort(similarity[i], descending=True)[:k].tolist() for i in range(n)])
        t2i = np.mean([t in torch.argsort(similarity[:, t], descending=True)[:k].tolist() for t in range(n)])
        assert result["modes"]["off"]["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        assert result["modes"]["off"]["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
    assert set(result["modes"]) == set(MODES)   # every mode of the table is evaluated
    assert result["chosen_mode"] == "off" and result["metrics"] == result["modes"]["off"]["metrics"]
    assert result["layer_lens"]["metric"] == "text_retrieval_recall@1"


def test_rank_scores_put_masked_classes_after_the_head_by_q_final():
    final = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    early = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    result = scoring.dola(final, early[None], [3], mode="static", alpha=0.5, static_layer=3)
    order = torch.argsort(metrics.rank_scores(result), dim=-1, descending=True)[0].tolist()
    # head {0, 1} (q_N >= 0.25): F = log(.5/.7) < log(.3/.1), so 1 before 0; then 2, 3 by q_N
    assert order == [1, 0, 2, 3]


def test_bad_task_rejected(tiny_loaded):
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate(tiny_loaded, "shapes", task="detection", progress=False)


def test_vision_only_model_evaluates_with_a_precomputed_bank(tiny_loaded, report, tmp_path):
    """No text tower (offline tokenizer missing, a timm/Janus tower): a saved bank gives the same metrics, its rows
    matched to the class names by label whatever their stored order."""
    import dataclasses

    from siglip_dola.text_bank.bank import TextBank
    from siglip_dola.text_bank.files import save_text_bank

    bank = build_text_bank(tiny_loaded, shapes.CLASSNAMES, shapes.TEMPLATES)
    order = torch.randperm(len(bank.labels), generator=torch.Generator().manual_seed(0))
    shuffled = TextBank([bank.labels[i] for i in order], bank.embeds[order], bank.model_id)
    save_text_bank(shuffled, tmp_path / "bank.safetensors")
    vision_only = dataclasses.replace(tiny_loaded, encode_text=None)
    with_bank = evaluate(vision_only, "shapes", split="test", n=N_IMAGES, progress=False,
                         bank=tmp_path / "bank.safetensors")
    for mode in ("off", "static", "dynamic"):
        assert with_bank["modes"][mode]["metrics"] == pytest.approx(report["modes"][mode]["metrics"], abs=1e-6)
    assert with_bank["bank"] == str(tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match="no text encoder"):
        evaluate(vision_only, "shapes", split="test", n=4, progress=False)
    wrong = TextBank([f"x{i}" for i in range(len(bank.labels))], bank.embeds, bank.model_id)
    with pytest.raises(ValueError, match="not the dataset's"):
        evaluate(tiny_loaded, "shapes", split="test", n=4, progress=False, bank=wrong)


def _naive_correct(q, labels, mode, layers, alpha):
    return np.array([naive_ranking(q[i], mode, layers, alpha)[0][0] == labels[i] for i in range(len(labels))])


def test_paired_statistics_match_scipy_on_the_naive_outcomes(report, naive):
    from scipy import stats as scipy_stats

    q, labels = naive
    off = _naive_correct(q, labels, "off", [], 0.1)
    for mode in ("static", "dynamic"):
        paired = report["paired"][mode]
        right = _naive_correct(q, labels, mode, report["modes"][mode]["settings"]["layers"], 0.1)
        fixed, broken = int((~off & right).sum()), int((off & ~right).sum())
        assert (paired["fixed"], paired["broken"], paired["n"]) == (fixed, broken, N_IMAGES)
        assert paired["delta"] == pytest.approx(right.mean() - off.mean())
        expected_p = scipy_stats.binomtest(fixed, fixed + broken).pvalue if fixed + broken else 1.0
        assert paired["mcnemar_p"] == pytest.approx(expected_p)
        assert paired["ci_low"] <= paired["delta"] <= paired["ci_high"]
        assert (paired["metric"], paired["confidence"], paired["n_resamples"], paired["seed"]) == ("acc1", 0.95, 10_000, 0)


def test_best_single_layer_reference_is_the_layer_alone_on_this_split(tiny_loaded, naive, tmp_path):
    calibration = calibrate(tiny_loaded, "shapes", split="val", n=24, progress=False)
    calibration["best_single_layer"] = {"layer": 4, "acc1": 0.5}  # as `calibrate` records it (config contract)
    result = evaluate(tiny_loaded, "shapes", split="test", n=N_IMAGES, calibration=calibration, progress=False)
    q, labels = naive
    alone = np.array([np.argmax(q[i][4]) == labels[i] for i in range(N_IMAGES)])
    off = _naive_correct(q, labels, "off", [], 0.1)
    single = result["reference"]["best_single_layer"]
    assert single["layer"] == 4 and "not DoLa" in single["note"]
    assert single["metrics"]["acc1"] == pytest.approx(alone.mean())
    assert single["paired"]["fixed"] == int((~off & alone).sum()) and single["paired"]["broken"] == int((off & ~alone).sum())
    assert single["chosen_on"] == {"dataset": "shapes", "split": "val", "acc1": 0.5}
    assert "best single layer 4 (not DoLa)" in summary_line(result)
    assert evaluate(tiny_loaded, "shapes", split="test", n=8, progress=False)["reference"] == {"best_single_layer": None}


def test_embedded_model_defaults_to_its_shipped_calibration():
    from siglip_dola.loading import load
    from siglip_dola.loading.embedded import EMBEDDED_CALIBRATION

    shipped = json.loads(EMBEDDED_CALIBRATION.read_text())
    result = evaluate(load(), "shapes", split="test", n=36, progress=False)
    assert result["chosen_mode"] == shipped["choice"]["mode"]
    assert result["settings"]["calibration"] == "embedded"
    assert result["settings"]["sources"] == {"mode": "calibration", "layers": "calibration", "alpha": "calibration",
                                             "contrast_weight": result["settings"]["sources"]["contrast_weight"]}
    assert result["metrics"] == result["modes"][shipped["choice"]["mode"]]["metrics"]
    assert evaluate(load(), "shapes", split="test", n=8, calibration="none", progress=False)["chosen_mode"] == "off"
    with pytest.raises(ValueError, match="calibration='none'"):  # asked for by name on its own split: refused
        evaluate(load(), "shapes", split="val", n=8, calibration="embedded", progress=False)
    on_val = evaluate(load(), "shapes", split="val", n=8, progress=False)  # the default is left out, not used on val
    assert on_val["chosen_mode"] == "off" and on_val["settings"]["calibration"] is None
