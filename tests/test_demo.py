"""`siglip-dola demo` end to end on the shipped embedded model, checked against the HF model's own logits."""
import json

import pytest

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

from siglip_dola.data import shapes
from siglip_dola.cli import main
from siglip_dola.demo import run_demo, split_effect_line
from siglip_dola.evaluation.evaluate import mode_points
from siglip_dola.loading.embedded import EMBEDDED_CALIBRATION, EMBEDDED_RESULTS

EMBEDDED = EMBEDDED_CALIBRATION.parent


def _tensor(output) -> torch.Tensor:
    """transformers 4.x returns the embedding tensor, 5.x an output object holding it as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _own_top1(paths) -> list[str]:
    """Baseline top-1 per image from SiglipModel's own logits_per_image with the ensembled class prompts."""
    model = SiglipModel.from_pretrained(EMBEDDED).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(EMBEDDED), AutoTokenizer.from_pretrained(EMBEDDED)
    with torch.no_grad():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        image_embeds = torch.nn.functional.normalize(_tensor(model.get_image_features(pixel_values=pixels)), dim=-1)
        class_embeds = []
        for name in shapes.CLASSNAMES:
            tokens = tokenizer([t.format(name) for t in shapes.TEMPLATES], padding="max_length", return_tensors="pt")
            text = torch.nn.functional.normalize(_tensor(model.get_text_features(**tokens)), dim=-1).mean(0)
            class_embeds.append(torch.nn.functional.normalize(text, dim=-1))
        logits = image_embeds @ torch.stack(class_embeds).T
    return [shapes.CLASSNAMES[i] for i in logits.argmax(-1).tolist()]


def test_demo_rows_match_the_models_own_zero_shot(tmp_path):
    rows, config, effect = run_demo(tmp_path, n=6)
    assert len(rows) == 6 and all((tmp_path / r.image).is_file() for r in rows)
    assert [r.baseline_label for r in rows] == _own_top1([tmp_path / r.image for r in rows])
    choice = json.loads(EMBEDDED_CALIBRATION.read_text())["choice"]
    assert choice["mode"] in config and all(0 < r.dola_prob <= 1 for r in rows)


def test_demo_cli_prints_table_and_real_model_hint(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "4", "--mode", "dynamic"]) == 0
    out = capsys.readouterr().out
    assert "baseline (q_N)" in out and "DoLa (p_hat)" in out and "top-1 on these 4 images" in out
    assert "test split" in out  # the whole split's effect (or why it is not measured) beside the 4 images
    assert "google/siglip-large-patch16-384" in out
    assert len(list((tmp_path / "demo").glob("*.png"))) == 4


def test_demo_quotes_the_shipped_test_split_effect_of_the_shipped_calibration(tmp_path):
    calibration = json.loads(EMBEDDED_CALIBRATION.read_text())
    results = json.loads(EMBEDDED_RESULTS.read_text())
    # the shipped results file was made with the shipped calibration (else: rerun tools/embedded_report.py)
    chosen = calibration["choice"]["mode"]
    point = mode_points(calibration["num_layers"], calibration)[chosen]
    settings = results["modes"][chosen]["settings"]
    assert (results["model"], results["dataset"], results["split"]) == ("embedded", "shapes", "test")
    assert (settings["layers"], settings["alpha"]) == (point.layers, point.alpha)
    assert results["chosen_mode"] == chosen and results["n_images"] == shapes.DEFAULT_SIZES["test"]
    _, _, effect = run_demo(tmp_path, n=4)
    if chosen == "off":
        assert "keeps the baseline" in effect
        return
    paired = results["paired"][chosen]
    assert paired["delta"] == pytest.approx(paired["value"] - paired["off"])
    assert paired["delta"] == pytest.approx((paired["fixed"] - paired["broken"]) / paired["n"])
    for value in (f"{paired['delta']:+.3f}", f"[{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]",
                  f"n = {paired['n']}", "The 4 images above illustrate"):
        assert value in effect


def test_effect_line_says_when_the_settings_were_not_measured(tmp_path):
    results = json.loads(EMBEDDED_RESULTS.read_text())
    for entry in results["modes"].values():
        entry["settings"]["alpha"] = 0.123  # settings nobody evaluated
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    used = type("Settings", (), {"mode": "dynamic", "layers": [2, 4], "static_layer": None, "alpha": 0.1,
                                 "contrast_weight": 1.0})()
    scorer = type("Scorer", (), {"settings": used})()
    assert "not measured for these settings" in split_effect_line(scorer, "embedded", 8, path)
    assert "siglip-dola eval --model other" in split_effect_line(scorer, "other", 8, path)
