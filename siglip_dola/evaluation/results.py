"""The result JSON of `eval`, its one-line summary, and `build`: many result files -> one CSV table.

Top level as clip_benchmark writes it (`dataset`, `model`, `pretrained`, `task`, `metrics`, `language`),
with `metrics` holding the CHOSEN mode's metrics under clip_benchmark's keys, so scripts that read
`metrics.acc1` read what the calibration chose. The calibration's choice is the chosen mode; without a
calibration it is `off` (uncalibrated DoLa has not earned a place). Beside them: `split`, `n_images`,
`chosen_mode`, `settings` (the chosen mode's, with where each value came from), `modes` (every mode's
settings and metrics), `paired` (each mode vs off on the same items), `reference.best_single_layer`
(a layer read out alone, not DoLa), `layer_lens`, `predictions`, `skipped`. Schema: docs/evaluation.md.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import replace
from pathlib import Path

from siglip_dola.evaluation.stats import format_delta, paired_comparison
from siglip_dola.io import atomic_path
from siglip_dola.modes import BASELINE

LANGUAGE = "en"
SINGLE_LAYER_NOTE = "a single layer read out alone; not DoLa"


def pretrained_of(model_id: str) -> str:
    """clip_benchmark's `pretrained`: the tag of an open_clip 'arch:tag' name, else the model id itself
    (a hub id, a path, or 'embedded' names its own weights)."""
    return model_id.split(":", 1)[1] if ":" in model_id else model_id


def chosen_mode(calibration: dict | None) -> str:
    """The calibration's choice; the baseline (`off`) without one."""
    return BASELINE if calibration is None else calibration["choice"]["mode"]


def _reference(scored, calibration: dict | None, paired_args: dict) -> dict:
    if scored.reference is None:
        return {"best_single_layer": None}
    ref = scored.reference
    return {"best_single_layer": {
        "layer": ref["layer"], "metrics": ref["metrics"],
        "paired": paired_comparison(scored.outcomes[BASELINE], ref["outcome"], scored.metric, **paired_args),
        "chosen_on": {"dataset": calibration["dataset"], "split": calibration["split"],
                      **{k: v for k, v in calibration["best_single_layer"].items() if k != "layer"}},
        "note": SINGLE_LAYER_NOTE}}


def assemble_report(model_id: str, dataset, task: str, embeddings, points: dict, scored, calibration: dict | None,
                    calibration_name: str | None, predictions: str | None = None, n_resamples: int = 10_000,
                    seed: int = 0) -> dict:
    """The result JSON (see the module docstring) from evaluate's TaskScores."""
    chosen = chosen_mode(calibration)
    paired_args = {"n_resamples": n_resamples, "seed": seed}
    modes = {mode: {"settings": replace(point, calibration=calibration_name).to_json(),
                    "metrics": scored.metrics[mode]} for mode, point in points.items()}
    paired = {mode: paired_comparison(scored.outcomes[BASELINE], scored.outcomes[mode], scored.metric, **paired_args)
              for mode in points if mode != BASELINE}
    return {"dataset": dataset.name, "model": model_id, "pretrained": pretrained_of(model_id), "task": task,
            "metrics": scored.metrics[chosen], "language": LANGUAGE,
            "split": dataset.split, "n_images": len(embeddings.ids), "chosen_mode": chosen,
            "settings": modes[chosen]["settings"], "modes": modes, "paired": paired,
            "reference": _reference(scored, calibration, paired_args), "layer_lens": scored.lens,
            "predictions": predictions, "skipped": [list(s) for s in embeddings.skipped]}


def summary_line(report: dict) -> str:
    """One line: the paired metric per mode with its delta vs off, 95% interval and McNemar p; the choice."""
    key = next(iter(report["paired"].values()))["metric"] if report["paired"] else "acc1"
    parts = [f"off={report['modes']['off']['metrics'][key]:.4f}"]
    for mode, paired in report["paired"].items():
        parts.append(f"{mode}={paired['value']:.4f} ({format_delta(paired)})")
    line = (f"{report['dataset']} [{report['split']}, n={report['n_images']}] {report['task']} {key}: "
            f"{' '.join(parts)}; chosen {report['chosen_mode']}")
    single = report["reference"]["best_single_layer"]
    if single is not None:
        line += (f"; best single layer {single['layer']} (not DoLa) {single['paired']['value']:.4f} "
                 f"({format_delta(single['paired'])})")
    return line


# ---------------------------------------------------------------- build: result files -> one table
LEADING_COLUMNS = ("dataset", "model", "pretrained", "model_fullname", "task", "language", "split", "n_images",
                   "chosen_mode")
NOT_TABULATED = ("layer_lens", "skipped", "plots")


def _flatten(prefix: str, value, row: dict) -> None:
    """Nested dicts -> dotted columns; lists -> compact JSON text."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, row)
    else:
        row[prefix] = json.dumps(value) if isinstance(value, list) else value


def table_row(report: dict) -> dict:
    """One CSV row of a result JSON: its top-level scalars, `metrics` unprefixed (as clip_benchmark build
    does), `model_fullname`, and every nested value as a dotted column (modes.static.metrics.acc1, paired.static.delta)."""
    missing = [k for k in ("dataset", "model", "task", "metrics") if k not in report]
    if missing or not isinstance(report.get("metrics"), dict):
        raise ValueError(f"not a result JSON of `siglip-dola eval` or `clip_benchmark eval`: lacks {missing or ['metrics']}")
    not_finite = sorted(key for key, value in report["metrics"].items()
                        if isinstance(value, float) and not math.isfinite(value))
    if not_finite:
        raise ValueError(f"metrics {not_finite} are not finite numbers (NaN or infinite): the run that wrote "
                         "this file went wrong; it is left out of the table")
    row = dict(report["metrics"])
    for key, value in report.items():
        if key not in ("metrics", *NOT_TABULATED):
            _flatten(key, value, row)
    row["model_fullname"] = f"{report['model']} {report.get('pretrained', '')}".strip()
    return row


def result_files(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return files


def build_table(paths, out: str | os.PathLike) -> tuple[int, list[tuple[str, str]]]:
    """Aggregate result JSON files (or folders of them) into one CSV at `out` (atomic): (rows written,
    [(file, why skipped)]). Columns: LEADING_COLUMNS, then the rest sorted; a cell a file lacks is empty.
    A file with non-finite metrics is skipped; `out` that is one of the inputs is refused before reading."""
    from siglip_dola.io import refuse_overlapping_paths

    files = result_files(paths)
    refuse_overlapping_paths({"out": out}, {"an input": p for p in files} if len(files) < 2 else
                             {f"input #{i + 1}": p for i, p in enumerate(files)})
    rows, skipped = [], []
    for path in files:
        try:
            rows.append(table_row(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, AttributeError) as err:
            skipped.append((str(path), f"{type(err).__name__}: {err}"))
    if not rows:
        from siglip_dola.failures import all_failed_message, first_few

        raise ValueError(f"no result JSON could be read from {first_few(paths)}: "
                         + all_failed_message("files", skipped))
    columns = {key for row in rows for key in row}
    fieldnames = [k for k in LEADING_COLUMNS if k in columns] + sorted(columns - set(LEADING_COLUMNS))
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    return len(rows), skipped
