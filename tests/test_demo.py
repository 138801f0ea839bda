"""`siglip-dola demo` end to end on the shipped embedded model, checked against the HF model's own logits."""
import json

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

from siglip_dola.data import shapes
from siglip_dola.cli import main
from siglip_dola.evaluation.demo import run_demo
from siglip_dola.loading.embedded import EMBEDDED_CALIBRATION

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
    rows, config = run_demo(tmp_path, n=6)
    assert len(rows) == 6 and all((tmp_path / r.image).is_file() for r in rows)
    assert [r.baseline_label for r in rows] == _own_top1([tmp_path / r.image for r in rows])
    choice = json.loads(EMBEDDED_CALIBRATION.read_text())["choice"]
    assert choice["mode"] in config and all(0 < r.dola_prob <= 1 for r in rows)


def test_demo_cli_prints_table_and_real_model_hint(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "4", "--mode", "dynamic"]) == 0
    out = capsys.readouterr().out
    assert "baseline (q_N)" in out and "DoLa (p_hat)" in out and "top-1 on these 4 images" in out
    assert "google/siglip-large-patch16-384" in out
    assert len(list((tmp_path / "demo").glob("*.png"))) == 4
