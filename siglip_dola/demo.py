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


from siglip_dola.loading.embedded import EMBEDDED_RESULTS  # noqa: E402
from siglip_dola.modes import BASELINE, MODES  # noqa: E402

REGENERATE = "python -m tools.embedded_report"


def make_scorer(model, mode: str | None, calibration=None):
    """The model's calibration (the embedded model's shipped one, chosen on its val split) unless `mode` is given:
    a given mode takes that mode's best settings from the calibration."""
    from siglip_dola.scorer import DoLaSigLIP

    return DoLaSigLIP(model, mode=mode, calibration=calibration)


def describe(scorer) -> str:
    """One line naming the scorer's DoLa configuration and where it came from."""
    return scorer.settings.describe()


def run_demo(out_dir: str | Path, n: int = 8, model_name: str | None = None, mode: str | None = None,
             seed: int = 0, calibration=None) -> tuple[list[DemoRow], str, str]:
    """Export `n` test-split shapes images to `out_dir` and classify them: (one DemoRow per image, config line,
    the whole test split's measured effect of these settings, with its interval)."""
    from siglip_dola.data import shapes
    from siglip_dola.loading import load
    from siglip_dola.text_bank.build import build_text_bank

    image_dir = shapes.export(out_dir, split="test", n=n, seed=seed, overwrite=True)  # its own folder
    true_labels = _read_labels(image_dir / "labels.csv")
    model = load(model_name)
    bank = build_text_bank(model, shapes.CLASSNAMES, shapes.TEMPLATES)
    paths = [str(image_dir / name) for name in true_labels]
    # top_k=None returns every class, so the baseline's own top-1 (argmax q_N) is there too: one forward.
    scorer = make_scorer(model, mode, calibration)
    results = scorer.classify(paths, bank, top_k=None)
    rows = [_row(result, true_labels[Path(result["image"]).name]) for result in results]
    return rows, describe(scorer), split_effect_line(scorer, model.model_id, len(rows))


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


def _same_settings(scorer, settings: dict) -> bool:
    """Does a result JSON mode entry's settings describe this scorer's DoLa configuration?"""
    used = scorer.settings  # DoLaSettings: what the scorer runs with
    if settings["mode"] != used.mode:
        return False
    if used.mode == BASELINE:
        return True
    layers = [used.static_layer] if MODES[used.mode].fixed_layer else list(used.layers)
    return (list(settings["layers"]) == layers and settings["alpha"] == used.alpha
            and (settings.get("contrast_weight") or 1.0) == used.contrast_weight)


def split_effect_line(scorer, model_id: str, n_shown: int, results_path=EMBEDDED_RESULTS) -> str:
    """One line: the whole test split's paired effect of the scorer's settings vs off, read from the shipped
    result JSON of `eval` (regenerated by tools/embedded_report.py), or why there is none."""
    import json
    from pathlib import Path

    results_path = Path(results_path)
    if model_id != "embedded" or not results_path.is_file():
        return (f"Effect on a whole split: not measured for this model/settings; run "
                f"`siglip-dola eval --model {model_id} --dataset DATA --split test --out r.json`.")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    mode = next((m for m, entry in results["modes"].items() if _same_settings(scorer, entry["settings"])), None)
    n = results["n_images"]
    if mode is None:
        return (f"Effect on the test split: not measured for these settings ({results_path.name} holds others); "
                f"`siglip-dola eval --dataset shapes --split test --out r.json` measures them, `{REGENERATE}` "
                "refreshes the shipped file.")
    if mode == BASELINE:
        return f"On the whole test split (n = {n}) the shipped calibration keeps the baseline: DoLa did not win on val."
    paired = results["paired"][mode]
    return (f"On the whole test split (n = {n}): top-1 off {paired['off']:.3f} -> DoLa {mode} {paired['value']:.3f}, "
            f"delta {paired['delta']:+.3f} (95% paired bootstrap CI [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}], "
            f"exact McNemar p = {paired['mcnemar_p']:.2f}; {paired['fixed']} images fixed, {paired['broken']} broken). "
            f"The {n_shown} images above illustrate; this line is the evidence ({results_path.name}, `{REGENERATE}`).")
