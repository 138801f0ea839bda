"""A study: many datasets, each calibrated on data apart from its test split, evaluated on test, one result each.

Per dataset (`run_study`): the calibration split is the set's `val` split; a set without one is calibrated on a
named held-out part of its `train` split (every HELD_OUT_EVERY-th item, e.g. "train[::5]"); a set with a single
split (a CSV, an ImageFolder without split folders, a wds: pattern; recorded as "all") is cut in two: "all[::5]"
calibrates, the other items ("all[rest of ::5]") are the test part. Test is never calibrated on. The result JSON
is eval's (docs/evaluation.md), plus `calibrated_on`; it is written atomically to <out>/results/<name>.json when
the dataset is done, so an interrupted dataset leaves no result and a rerun resumes after the last finished one.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from siglip_dola.data.datasets import evenly_spaced, load_dataset
from siglip_dola.data.eval_dataset import EvalDataset, take
from siglip_dola.evaluation.calibrate import CalibrationGrid, calibrate
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.io import write_json_atomic
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL, RETRIEVAL_METRIC

HELD_OUT_EVERY = 5
TASK_CHOICES = ("auto", CLASSIFICATION, RETRIEVAL)
RESULTS, CALIBRATIONS = "results", "calibrations"


def parse_dataset_list(text: str) -> list[str]:
    """'a,b,c' or '@file' (one dataset per line or comma-separated; blank lines and '#' comments skipped), as
    clip_benchmark's `--dataset benchmark/datasets.txt`. Repeats are kept once."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FileNotFoundError(f"datasets list {str(path)!r} does not exist")
        text = ",".join(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
    parts = re.split(r",(?![^{]*\})", text)  # a comma inside {...} belongs to a wds: brace pattern
    names = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not names:
        raise ValueError(f"datasets must name at least one dataset (comma-separated or @file), got {text!r}")
    return names


def result_stem(name: str) -> str:
    """A file name for dataset `name`: itself when it is a plain name, else a readable slug + a short hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[-80:] or "dataset"
    return slug if slug == name else f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def _held_out(dataset: EvalDataset) -> tuple[EvalDataset, EvalDataset]:
    """(every HELD_OUT_EVERY-th item, the other items), as named parts of the dataset's split."""
    every = HELD_OUT_EVERY
    held = [i for i in range(len(dataset.items)) if i % every == 0]
    rest = [i for i in range(len(dataset.items)) if i % every != 0]
    return (take(dataset, held, f"{dataset.split}[::{every}]"),
            take(dataset, rest, f"{dataset.split}[rest of ::{every}]"))


def study_splits(name: str, root=None, limit: int | None = None) -> tuple[EvalDataset, EvalDataset, dict]:
    """(calibration data, test data, `calibrated_on` record) of dataset `name` (see the module docstring);
    `limit`: at most that many evenly spaced items of each."""
    test = load_dataset(name, root=root)  # its test split, or all of a set with one split
    if test.split == "all":
        calibration, test = _held_out(test)
        how = f"held-out part (every {HELD_OUT_EVERY}th item) of the set's only split; tested on the other items"
    else:
        try:
            calibration = load_dataset(name, split="val", root=root)
            no_val = None if calibration.split == "val" else "no val split"
        except (FileNotFoundError, ValueError, AssertionError) as err:  # clip_benchmark asserts on unknown splits
            no_val = f"{type(err).__name__}: {err}"
        if no_val is None:
            how = "the val split"
        else:
            try:
                train = load_dataset(name, split="train", root=root)
            except (FileNotFoundError, ValueError, AssertionError) as err:
                raise ValueError(f"dataset {name!r} has no split to calibrate on: no val split ({no_val}) and no "
                                 f"train split ({type(err).__name__}: {err})") from None
            calibration = _held_out(train)[0]
            how = f"held-out part (every {HELD_OUT_EVERY}th item) of the train split (the set has no val split)"
    capped = lambda d: d if limit is None or limit >= len(d.items) else evenly_spaced(d, limit)  # noqa: E731
    calibration, test = capped(calibration), capped(test)  # --limit caps: a smaller part is no warning
    return calibration, test, {"split": calibration.split, "n_items": len(calibration.items), "how": how}


def _task(dataset: EvalDataset, task: str) -> str:
    if task != "auto":
        return task
    return CLASSIFICATION if CLASSIFICATION in dataset.tasks else RETRIEVAL


@dataclass
class StudyRun:
    """Where a study wrote its results, and what happened to each dataset."""
    out_dir: Path
    done: list[str] = field(default_factory=list)       # evaluated in this run
    kept: list[str] = field(default_factory=list)       # a result existed: skipped (no --overwrite)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (dataset, why)

    def result_path(self, name: str) -> Path:
        return self.out_dir / RESULTS / f"{result_stem(name)}.json"

    def calibration_path(self, name: str) -> Path:
        return self.out_dir / CALIBRATIONS / f"{result_stem(name)}.json"

    def result_paths(self, names: list[str]) -> list[Path]:
        """The result files of `names` that exist, in list order."""
        return [p for p in map(self.result_path, names) if p.is_file()]


def run_one(model, name: str, run: StudyRun, task: str = "auto", root=None, limit: int | None = None,
            grid: CalibrationGrid | None = None, metric: str = RETRIEVAL_METRIC, batch_size: int = 32,
            progress: bool = True, n_resamples: int = 10_000, seed: int = 0) -> dict | None:
    """Calibrate and evaluate one dataset; its result JSON written (atomically) last. None on torchrun ranks > 0."""
    calibration_data, test, calibrated_on = study_splits(name, root, limit)
    task = _task(test, task)
    if task not in test.tasks:
        raise ValueError(f"dataset {name!r} supports tasks {list(test.tasks)}, not {task!r}")
    calibration_path = run.calibration_path(name)
    calibrate(model, calibration_data, grid=grid, out=calibration_path, batch_size=batch_size, progress=progress,
              task=task, metric=metric)
    report = evaluate(model, test, calibration=str(calibration_path), task=task, batch_size=batch_size,
                      progress=progress, n_resamples=n_resamples, seed=seed)
    if report is None:
        return None
    report["calibrated_on"] = {**calibrated_on, "calibration": str(calibration_path)}
    write_json_atomic(run.result_path(name), report)
    return report


def run_study(model, names: list[str], out_dir: str | os.PathLike, overwrite: bool = False, **options) -> StudyRun:
    """Run `run_one` over `names` in order, skipping those whose result exists (unless `overwrite`).

    A dataset that fails (missing files, no usable split, ...) is reported on stderr and recorded in `failed`;
    the others go on. Ctrl-C stops the study; finished datasets keep their results. options: run_one's.
    """
    if options.get("task", "auto") not in TASK_CHOICES:
        raise ValueError(f"task must be one of {TASK_CHOICES}, got {options['task']!r}")
    run = StudyRun(Path(out_dir))
    for name in names:
        if run.result_path(name).is_file() and not overwrite:
            run.kept.append(name)
            continue
        try:
            run_one(model, name, run, **options)
        except (ValueError, OSError, RuntimeError, ImportError, AssertionError) as err:
            why = f"{type(err).__name__}: {err}" if isinstance(err, AssertionError) else str(err)
            warnings.warn(f"dataset {name!r} failed: {why}", stacklevel=2)
            run.failed.append((name, why))
            continue
        run.done.append(name)
    return run
