"""Report for the embedded model, built from `siglip-dola calibrate` + `siglip-dola eval` (no second pipeline).

    python -m tools.embedded_report                 # shipped checkpoint + shipped calibration -> files below + README
    python -m tools.embedded_report --calibrate     # first rerun `calibrate` on val (rewrites calibration.json)

Beside the checkpoint it writes ``results_test.json`` (eval's result JSON on the test split; the demo
reads it), ``metrics.json`` (training record, data recipe and a summary of the results) and
``MODEL_CARD.md``; with ``--readme`` (default: the repo's README.md for the shipped checkpoint) it
rewrites the table between the README's ``<!-- embedded-report -->`` markers. Every number comes from
the calibration (chosen on VAL) evaluated on TEST; nothing is chosen on test.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from siglip_dola.data import shapes
from siglip_dola.evaluation.calibrate import calibrate
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.evaluation.stats import bootstrap_proportion_interval
from siglip_dola.io import write_json_atomic, write_text_atomic
from siglip_dola.loading.embedded import EMBEDDED_DIR
from siglip_dola.modes import BASELINE, MODES
from tools import model_card

RESULTS_NAME = "results_test.json"
README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("<!-- embedded-report:start -->", "<!-- embedded-report:end -->")
COMMAND = "python -m tools.embedded_report"


def _load(model_dir: Path):
    from siglip_dola.loading import load

    return load(None if model_dir.resolve() == EMBEDDED_DIR.resolve() else str(model_dir), device="cpu")


def run(model_dir, calibrate_first: bool = False, progress: bool = True, n_val: int | None = None,
        n_test: int | None = None) -> tuple[dict, dict, list[dict]]:
    """(calibration, result JSON, prediction rows): `calibrate` on val when asked (or when the checkpoint
    has none), then `evaluate` on test with that calibration."""
    model_dir = Path(model_dir)
    model = _load(model_dir)
    calibration_path = model_dir / "calibration.json"
    if calibrate_first or not calibration_path.is_file():
        calibrate(model, "shapes", split="val", out=calibration_path, n=n_val, progress=progress)
    calibration = json.loads(calibration_path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        predictions = Path(tmp) / "predictions.jsonl"
        name = "embedded" if model.model_id == "embedded" else calibration_path
        results = evaluate(model, "shapes", split="test", calibration=name, predictions=predictions,
                           n=n_test, progress=progress)
        rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    results["predictions"] = None  # per-image rows are not shipped: `siglip-dola eval --predictions` writes them
    return calibration, results, rows


def held_out_top1(rows: list[dict]) -> dict:
    """{mode: top-1 on the images of classes never seen in training}."""
    held = [r for r in rows if r["label"] in shapes.HELD_OUT]
    return {mode: sum(r["modes"][mode]["top5"][0]["index"] == r["label_index"] for r in held) / len(held)
            for mode in rows[0]["modes"]}


def attribute_accuracy(rows: list[dict], mode: str = "off") -> dict:
    """How often `mode`'s top-1 class has the right colour / the right shape (36-way prediction)."""
    pairs = [(r["modes"][mode]["top5"][0]["label"].split(), r["label"].split()) for r in rows]
    return {f"{attribute}_correct": sum(p[k] == t[k] for p, t in pairs) / len(pairs)
            for k, attribute in enumerate(("colour", "shape"))}


def summary(calibration: dict, results: dict, rows: list[dict]) -> dict:
    """metrics.json's "zero_shot": headline numbers of the result JSON, plus held-out and attribute accuracy."""
    lens, held = results["layer_lens"], held_out_top1(rows)
    modes = {mode: {"settings": entry["settings"], "top1": entry["metrics"]["acc1"],
                    "top1_held_out": held[mode], "paired": results["paired"].get(mode)}
             for mode, entry in results["modes"].items()}
    return {"n_val": calibration["n_images"], "n_test": results["n_images"],
            "n_test_held_out": sum(r["label"] in shapes.HELD_OUT for r in rows), "tau": round(calibration["tau"], 5),
            "templates": list(shapes.TEMPLATES), "results": RESULTS_NAME, "chosen_mode": results["chosen_mode"],
            "final_layer": {"top1": results["modes"]["off"]["metrics"]["acc1"], "top1_held_out": held["off"],
                            **attribute_accuracy(rows)},
            "layer_top1": {str(j): v for j, v in zip(lens["layers"], lens["top1"])},
            "modes": modes, "best_single_layer": results["reference"]["best_single_layer"], "command": COMMAND}


def _fmt_interval(low: float, high: float, signed: bool = False) -> str:
    spec = "+.3f" if signed else ".3f"
    return f"[{low:{spec}}, {high:{spec}}]"


def _settings_text(settings: dict) -> str:
    if settings["mode"] == BASELINE:
        return "final layer, q_N"
    fixed = MODES[settings["mode"]].fixed_layer
    layers = f"layer {settings['static_layer']}" if fixed else f"layers {settings['layers']}"
    return f"{layers}, alpha {settings['alpha']}, lambda {settings['contrast_weight']}"


def _row(label: str, settings: str, value: float, n: int, paired: dict | None, held: str) -> str:
    low, high = bootstrap_proportion_interval(round(value * n), n)
    effect = "" if paired is None else (
        f"{paired['delta']:+.3f} {_fmt_interval(paired['ci_low'], paired['ci_high'], True)} | "
        f"{paired['mcnemar_p']:.2f} | {paired['fixed']} / {paired['broken']}")
    return f"| {label} | {settings} | {value:.3f} {_fmt_interval(low, high)} | {effect or '- | - | -'} | {held} |"


def readme_table(calibration: dict, results: dict, rows: list[dict]) -> str:
    """The README's embedded-model table: off / static / dynamic / best single layer, each with its interval."""
    n, held, chosen = results["n_images"], held_out_top1(rows), results["chosen_mode"]
    lines = ["| method | settings (chosen on val) | top-1 [95% CI] | vs off: delta [95% CI] | McNemar p | "
             "fixed / broken | held-out classes |", "|---|---|---|---|---|---|---|"]
    for mode, entry in results["modes"].items():   # every mode of the table
        label = (f"final layer (baseline, `{mode}`)" if mode == BASELINE else f"DoLa {mode}") + \
            (" **(chosen)**" if mode == chosen else "")
        lines.append(_row(label, _settings_text(entry["settings"]), entry["metrics"]["acc1"], n,
                          results["paired"].get(mode), f"{held[mode]:.3f}"))
    single = results["reference"]["best_single_layer"]
    if single is not None:
        lines.append(_row("best single layer read out alone (reference, not DoLa)", f"layer {single['layer']}",
                          single["metrics"]["acc1"], n, single["paired"], "-"))
    grid = calibration.get("grid", {})
    weights = (f"contrast weight lambda {grid['contrast_weights']}" if "contrast_weights" in grid
               else "contrast weight lambda 1 only (this calibration's grid predates lambda)")
    lines += ["", f"Test split n = {n} (chance {1 / len(shapes.CLASSNAMES):.3f}); every setting chosen on val "
              f"(n = {calibration['n_images']}) by `siglip-dola calibrate` over alpha {grid.get('alphas')}, "
              f"{weights}, {grid.get('n_buckets')} buckets and {grid.get('static_parity', 'even')} static layers. Intervals: 95% paired bootstrap over the test images (10,000 resamples, "
              "seed 0); p: exact McNemar; fixed / broken: images `off` got wrong and DoLa right / the reverse."]
    if chosen != "off":
        paired = results["paired"][chosen]
        within = paired["ci_low"] <= 0 <= paired["ci_high"]
        lines.append(f"The chosen mode's interval {'includes' if within else 'excludes'} 0: on this model the "
                     f"measured DoLa effect is {'within the noise' if within else 'outside the noise'}.")
    else:
        lines.append("The calibration kept the baseline: DoLa did not beat `off` on val.")
    if single is None:
        lines.append(f"The calibration records no best single layer; `{COMMAND} --calibrate` adds it.")
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    """Replace the text between the README's embedded-report markers with `table` (atomically)."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        raise ValueError(f"{readme} lacks the markers {MARKERS[0]} ... {MARKERS[1]}")
    note = f"<!-- regenerated by `{COMMAND}`; do not edit by hand -->"
    write_text_atomic(readme, f"{text[:start]}{MARKERS[0]}\n{note}\n{table}\n{text[end:]}")


def write_report(model_dir, calibrate_first: bool = False, readme: Path | None = None,
                 progress: bool = True, n_val: int | None = None, n_test: int | None = None) -> tuple[dict, str]:
    """Run calibrate (optionally) + evaluate; write results_test.json, metrics.json, MODEL_CARD.md (and the
    README's table): (metrics.json's content, the table)."""
    model_dir = Path(model_dir)
    calibration, results, rows = run(model_dir, calibrate_first, progress, n_val, n_test)
    write_json_atomic(model_dir / RESULTS_NAME, results)
    training_path = model_dir / "training.json"
    training = json.loads(training_path.read_text(encoding="utf-8")) if training_path.is_file() else {}
    metrics = {"training": training, "data": model_card.data_recipe(), "zero_shot": summary(calibration, results, rows)}
    write_json_atomic(model_dir / "metrics.json", metrics)
    table = readme_table(calibration, results, rows)
    if training:
        write_text_atomic(model_dir / "MODEL_CARD.md", model_card.model_card(metrics, table))
    if readme is not None:
        update_readme(readme, table)
    return metrics, table


def main(argv=None) -> int:
    """CLI: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=EMBEDDED_DIR, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--calibrate", action="store_true", help="rerun `calibrate` on val first")
    parser.add_argument("--readme", type=Path, default=None,
                        help="README whose embedded-report table to rewrite (default: the repo's, for the shipped checkpoint)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    readme = args.readme or (README if args.dir.resolve() == EMBEDDED_DIR.resolve() else None)
    _, table = write_report(args.dir, args.calibrate, readme, args.progress)
    print(table)
    print(f"wrote {args.dir / RESULTS_NAME}, metrics.json, MODEL_CARD.md" + (f", the table in {readme}" if readme else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
