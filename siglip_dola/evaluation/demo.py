"""`siglip-dola demo`: classify a few generated `shapes` images with the baseline and with DoLa, offline."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

REAL_MODEL_HINT = """\
To use real SigLIP ViT-L/16 weights instead of the embedded model:
  siglip-dola classify IMAGES... --labels "cat,dog" --model google/siglip-large-patch16-384
  siglip-dola classify IMAGES... --labels "cat,dog" --model ViT-L-16-SigLIP-384:webli       (open_clip)
  siglip-dola classify IMAGES... --labels "cat,dog" --model /path/to/saved/siglip             (local folder)
Hub names need the weights in the local Hugging Face cache (HF_HOME) or network access."""


@dataclass
class DemoRow:
    """One demo image: its true class, the baseline (q_N) and DoLa top-1, and DoLa's premature layer."""
    image: str
    true_label: str
    baseline_label: str
    baseline_prob: float
    dola_label: str
    dola_prob: float
    premature_layer: int | None


def make_scorer(model, mode: str | None, calibration=None):
    """The model's calibration (the embedded model's shipped one, chosen on its val split) unless `mode` is given:
    a given mode takes that mode's best settings from the calibration."""
    from siglip_dola.scorer import DoLaSigLIP

    return DoLaSigLIP(model, mode=mode, calibration=calibration)


def describe(scorer) -> str:
    """One line naming the scorer's DoLa configuration and where it came from."""
    return scorer.settings.describe()


def run_demo(out_dir: str | Path, n: int = 8, model_name: str | None = None, mode: str | None = None,
             seed: int = 0, calibration=None) -> tuple[list[DemoRow], str]:
    """Export `n` test-split shapes images to `out_dir` and classify them: (one DemoRow per image, config line)."""
    from siglip_dola.data import shapes
    from siglip_dola.loading import load
    from siglip_dola.text_bank import build_text_bank

    image_dir = shapes.export(out_dir, split="test", n=n, seed=seed)
    true_labels = _read_labels(image_dir / "labels.csv")
    model = load(model_name)
    bank = build_text_bank(model, shapes.CLASSNAMES, shapes.TEMPLATES)
    paths = [str(image_dir / name) for name in true_labels]
    # top_k=None returns every class, so the baseline's own top-1 (argmax q_N) is there too: one forward.
    scorer = make_scorer(model, mode, calibration)
    results = scorer.classify(paths, bank, top_k=None)
    return [_row(result, true_labels[Path(result["image"]).name]) for result in results], describe(scorer)


def _row(result: dict, true_label: str) -> DemoRow:
    predictions = result["predictions"]
    dola_top = predictions[0]  # ranked by DoLa probability
    baseline_top = max(predictions, key=lambda p: p["baseline_score"])
    return DemoRow(Path(result["image"]).name, true_label, baseline_top["label"], baseline_top["baseline_score"],
                   dola_top["label"], dola_top["score"], result["premature_layer"])


def _read_labels(labels_csv: Path) -> dict[str, str]:
    with open(labels_csv, newline="", encoding="utf-8") as f:
        return {row["path"]: row["label"] for row in csv.DictReader(f)}


def format_table(rows: list[DemoRow]) -> str:
    """A fixed-width table of demo rows plus the accuracy of both scorers on them."""
    header = f"{'image':<16} {'true class':<16} {'baseline (q_N)':<24} {'DoLa (p_hat)':<24} {'layer M':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        layer = "-" if r.premature_layer is None else str(r.premature_layer)
        lines.append(f"{r.image:<16} {r.true_label:<16} {r.baseline_label + f' {r.baseline_prob:.2f}':<24} "
                     f"{r.dola_label + f' {r.dola_prob:.2f}':<24} {layer:>7}")
    baseline_hits = sum(r.baseline_label == r.true_label for r in rows)
    dola_hits = sum(r.dola_label == r.true_label for r in rows)
    lines.append(f"top-1 on these {len(rows)} images: baseline {baseline_hits}/{len(rows)}, DoLa {dola_hits}/{len(rows)}")
    return "\n".join(lines)
