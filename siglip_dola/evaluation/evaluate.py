"""Evaluation on a split the calibration never saw: off / static / dynamic metrics and the layer lens.

The JSON follows clip_benchmark's layout (`dataset`, `model`, `task`, `metrics`) with metrics per mode
(`metrics.off`, `metrics.static`, `metrics.dynamic`), plus `layer_lens`: top-1 of every layer read out
alone, how often dynamic mode chose each layer, and the mean JSD(q_N || q_j) per layer.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch

from siglip_dola import scoring as runtime
from siglip_dola.evaluation.calibrate import (all_layers, as_dataset, caption_pairs, class_logits, embed_dataset,
                                              read_calibration, text_embeds, text_to_image_logits)
from siglip_dola.evaluation.layer_logits import LayerLogits, score_modes
from siglip_dola.data.datasets import TASKS, EvalDataset
from siglip_dola.io import write_json_atomic
from siglip_dola.layers import MODES
from siglip_dola.evaluation.metrics import (classification_metrics, hits_at_k, one_hot_targets, rank_scores,
                                 retrieval_metrics)
from siglip_dola.settings import NO_CALIBRATION, read_calibration_file, resolve_settings


def _same_dataset(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_calibration(calibration: dict, model, dataset: EvalDataset) -> None:
    """Refuse a calibration made for another model, or on the very split being evaluated."""
    if calibration["model"] != model.model_id:
        raise ValueError(f"calibration was made for model {calibration['model']!r}, not {model.model_id!r}")
    if _same_dataset(calibration["dataset"], dataset.name) and calibration["split"] == dataset.split:
        raise ValueError(f"calibration used split {calibration['split']!r} of dataset {calibration['dataset']!r}, "
                         "the split being evaluated: evaluate on a split the calibration never saw (e.g. calibrate on val, "
                         "evaluate on test)")


def _calibration_for(model, dataset: EvalDataset, calibration, task: str) -> tuple[str | None, dict | None]:
    """(name, report) of the calibration to use: `calibration` (path, "embedded", dict, "none"), or None for
    the model's default (the embedded model's shipped one). An explicit one made on this split is refused;
    the default one is then left out, with one line on stderr."""
    implicit = calibration is None
    calibration = getattr(model, "calibration", None) if implicit else calibration
    if calibration is None or str(calibration) == NO_CALIBRATION:
        return None, None
    name, report = read_calibration_file(calibration, task)
    report = read_calibration(report)
    try:
        check_calibration(report, model, dataset)
    except ValueError as err:
        if not implicit:
            raise
        print(f"siglip-dola eval: not using the default calibration {name!r}: {err}", file=sys.stderr)
        return None, None
    return name, report


def mode_points(num_layers: int, calibration: dict | None) -> dict:
    """{mode: grid point} for off, static, dynamic: the calibration's best of each mode, else the defaults
    (both through siglip_dola.settings, the one policy)."""
    points = {}
    for mode in MODES:
        settings = resolve_settings(num_layers, mode=mode, calibration=calibration, warn=False)
        off = mode == "off"
        points[mode] = {"mode": mode, "layers": [] if off else settings.layers, "static_layer": settings.static_layer,
                        "alpha": None if off else settings.alpha,
                        "contrast_weight": None if off else settings.contrast_weight,
                        "bucket": None if off else settings.bucket, "n_buckets": None if off else settings.n_buckets}
    return points


def layer_lens(cache: LayerLogits, targets: torch.Tensor, dynamic: runtime.DoLaResult, metric: str) -> dict:
    """Top-1 of each layer alone (targets [n, C] bool), dynamic mode's chosen-layer counts and mean
    JSD(q_N || q_j) per layer j; the layers' log-probs are computed chunk by chunk (layer_logits.py)."""
    num_layers, final = cache.num_layers, cache.final
    hits, jsd = [], []
    for rows, chunk_final, stack in cache.iter_chunks():
        hits.append(torch.stack([hits_at_k(stack[j], targets[rows], 1) for j in range(num_layers - 1)]))  # (N-1, r)
        jsd.append(runtime.dola(chunk_final, stack, list(range(1, num_layers)), mode="off").jsd)  # (N-1, r)
    top1 = [float(row.float().mean()) for row in torch.cat(hits, dim=1)]
    baseline = float(hits_at_k(final, targets, 1).float().mean())
    jsd_table = torch.cat(jsd, dim=1)  # (N-1, n)
    counts = Counter(int(j) for j in dynamic.premature_layer.flatten().tolist())
    return {"metric": metric, "layers": list(range(1, num_layers + 1)), "top1": top1 + [baseline],
            "baseline_top1": baseline, "dynamic_layer_counts": {str(j): counts[j] for j in sorted(counts)},
            "jsd_layers": list(range(1, num_layers)), "mean_jsd": jsd_table.mean(dim=-1).tolist()}


def _classification(model, dataset, embeddings, points) -> tuple[dict, dict]:
    cache = class_logits(model, dataset, embeddings)
    results = score_modes(cache, points)
    metrics = {mode: classification_metrics(rank_scores(r), cache.labels) for mode, r in results.items()}
    targets = one_hot_targets(cache.labels, cache.final.shape[-1])
    return metrics, layer_lens(cache, targets, results["dynamic"], "acc1")


def _retrieval(model, dataset, embeddings, points) -> tuple[dict, dict]:
    texts, text_image = caption_pairs(dataset, embeddings)  # (T,) image of each caption
    text = text_embeds(model, texts)
    i2t_final = runtime.build_log_probs_from_rep(embeddings.z_final, text, model.tau)  # (I, T)
    i2t = LayerLogits(i2t_final, None, embeddings, model.tau, row_layers=embeddings.z_layers, columns=text)
    t2i = text_to_image_logits(model, text, text_image, embeddings)
    i2t_results, t2i_results = score_modes(i2t, points), score_modes(t2i, points)
    metrics = {mode: retrieval_metrics(rank_scores(i2t_results[mode]), rank_scores(t2i_results[mode]), text_image)
               for mode in points}
    targets = one_hot_targets(text_image, len(embeddings.ids)).T  # (I, T)
    return metrics, layer_lens(i2t, targets, i2t_results["dynamic"], "text_retrieval_recall@1")


def summary_line(report: dict) -> str:
    """One line for the terminal: the headline metric per mode."""
    key = "acc1" if report["task"] == "zeroshot_classification" else "text_retrieval_recall@1"
    parts = " ".join(f"{mode}={report['metrics'][mode][key]:.4f}" for mode in MODES)
    return f"{report['dataset']} [{report['split']}, n={report['n_images']}] {report['task']} {key}: {parts}"


def evaluate(model, dataset, split: str = "test", calibration=None, out: str | os.PathLike | None = None,
             plots_dir: str | os.PathLike | None = None, task: str = "zeroshot_classification",
             n: int | None = None, batch_size: int = 32, progress: bool = True) -> dict | None:
    """Metrics for off / static / dynamic on `split`, written to `out` (atomic JSON) and PNGs in `plots_dir`.

    `calibration`: a calibration JSON path, "embedded", a dict or "none" (refused if made for another model or on
    this split); None: the model's default calibration (the embedded model's shipped one), else the design
    note's defaults (last of 3 buckets, static layer its middle candidate, alpha 0.1, lambda 1).
    report["settings"]: the chosen settings (the calibration's choice) and where each value came from.
    Under torchrun rank 0 returns the report, the other ranks None.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    dataset = as_dataset(dataset, split, n)
    if task not in dataset.tasks:
        raise ValueError(f"dataset {dataset.name!r} supports tasks {list(dataset.tasks)}, not {task!r}")
    name, calibration_report = _calibration_for(model, dataset, calibration, task)
    settings = resolve_settings(model.readout.num_layers, calibration=calibration_report, model_id=model.model_id,
                                task=task, warn=True)
    settings.calibration = name
    points = mode_points(model.readout.num_layers, calibration_report)
    embeddings = embed_dataset(model, dataset, batch_size, progress)
    if embeddings is None:
        return None
    run = _classification if task == "zeroshot_classification" else _retrieval
    metrics, lens = run(model, dataset, embeddings, points)
    report = {"dataset": dataset.name, "model": model.model_id, "task": task, "split": dataset.split,
              "n_images": len(embeddings.ids), "skipped": [list(s) for s in embeddings.skipped],
              "calibration": name, "settings": settings.to_json(), "modes": points, "metrics": metrics, "layer_lens": lens}
    if plots_dir is not None:
        from siglip_dola.evaluation.plots import plot_layer_lens
        report["plots"] = [str(p) for p in plot_layer_lens(report, plots_dir)]
    if out is not None:
        write_json_atomic(out, report)
    return report
