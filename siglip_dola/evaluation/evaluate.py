"""Evaluation on a split the calibration never saw: off / static / dynamic metrics and the layer lens.

The JSON follows clip_benchmark's layout (`dataset`, `model`, `task`, `metrics`) with metrics per mode
(`metrics.off`, `metrics.static`, `metrics.dynamic`), plus `layer_lens`: top-1 of every layer read out
alone, how often dynamic mode chose each layer, and the mean JSD(q_N || q_j) per layer.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from siglip_dola import scoring as runtime
from siglip_dola.evaluation.calibrate import (all_layers, as_dataset, class_logits, embed_dataset, read_calibration,
                                   score_point)
from siglip_dola.data.datasets import TASKS, EvalDataset
from siglip_dola.evaluation.embed import embed_texts
from siglip_dola.io import write_json_atomic
from siglip_dola.layers import MODES
from siglip_dola.evaluation.metrics import (classification_metrics, hits_at_k, one_hot_targets, rank_scores,
                                 retrieval_metrics)
from siglip_dola.scorer import choose_layers
from siglip_dola.text_bank import load_text_bank


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


def mode_points(num_layers: int, calibration: dict | None) -> dict:
    """{mode: grid point} for off, static, dynamic: the calibration's best of each mode, else the defaults."""
    best = (calibration or {}).get("best", {})
    points = {}
    for mode in MODES:
        choice = best.get(mode, {"mode": mode})
        explicit = [choice["static_layer"]] if choice.get("static_layer") is not None else choice.get("layers")
        layers, static_layer = choose_layers(num_layers, mode, explicit, choice.get("bucket"),
                                             choice.get("n_buckets") or 3, choice.get("static_layer"))
        points[mode] = {"mode": mode, "layers": layers if mode != "off" else [], "static_layer": static_layer,
                        "alpha": None if mode == "off" else float(choice.get("alpha", 0.1)),
                        "bucket": choice.get("bucket"), "n_buckets": choice.get("n_buckets")}
    return points


def layer_lens(final: torch.Tensor, layers: torch.Tensor, targets: torch.Tensor,
               dynamic: runtime.DoLaResult, metric: str) -> dict:
    """Top-1 of each layer alone (layers [N-1, n, C], final [n, C] log-probs; targets [n, C] bool), dynamic
    mode's chosen-layer counts and mean JSD(q_N || q_j) per layer j."""
    num_layers = layers.shape[0] + 1
    top1 = [float(hits_at_k(layers[j], targets, 1).float().mean()) for j in range(num_layers - 1)]
    baseline = float(hits_at_k(final, targets, 1).float().mean())
    jsd_table = runtime.dola(final, layers, list(range(1, num_layers)), mode="off").jsd  # (N-1, n)
    counts = Counter(int(j) for j in dynamic.premature_layer.flatten().tolist())
    return {"metric": metric, "layers": list(range(1, num_layers + 1)), "top1": top1 + [baseline],
            "baseline_top1": baseline, "dynamic_layer_counts": {str(j): counts[j] for j in sorted(counts)},
            "jsd_layers": list(range(1, num_layers)), "mean_jsd": jsd_table.mean(dim=-1).tolist()}


def _classification(model, dataset, embeddings, points, bank=None) -> tuple[dict, dict]:
    cache = class_logits(model, dataset, embeddings, bank)
    results = {mode: score_point(cache.final, cache.layers, point) for mode, point in points.items()}
    metrics = {mode: classification_metrics(rank_scores(r), cache.labels) for mode, r in results.items()}
    targets = one_hot_targets(cache.labels, cache.final.shape[-1])
    return metrics, layer_lens(cache.final, cache.layers, targets, results["dynamic"], "acc1")


def _retrieval(model, dataset, embeddings, points, bank=None) -> tuple[dict, dict]:
    captions = [dataset.captions[i] for i in embeddings.indices]
    texts = [c for caps in captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.int64)  # (T,)
    if not texts:
        raise ValueError(f"dataset {dataset.name!r} has no captions: retrieval needs image-caption pairs")
    text = embed_texts(model, texts, needed_for="retrieval")  # (T, D)
    i2t_final = runtime.build_log_probs_from_rep(embeddings.z_final, text, model.tau)  # (I, T)
    i2t_layers = runtime.build_log_probs_from_rep(embeddings.z_layers, text, model.tau)  # (N-1, I, T)
    t2i_final = runtime.build_log_probs_from_rep(text, embeddings.z_final, model.tau)  # (T, I)
    t2i_layers = torch.stack([runtime.build_log_probs_from_rep(text, z_j, model.tau)
                              for z_j in embeddings.z_layers])  # (N-1, T, I)
    metrics, dynamic = {}, None
    for mode, point in points.items():
        i2t = score_point(i2t_final, i2t_layers, point)
        t2i = score_point(t2i_final, t2i_layers, point)
        metrics[mode] = retrieval_metrics(rank_scores(i2t), rank_scores(t2i), text_image)
        dynamic = i2t if mode == "dynamic" else dynamic
    targets = one_hot_targets(text_image, len(captions)).T  # (I, T)
    return metrics, layer_lens(i2t_final, i2t_layers, targets, dynamic, "text_retrieval_recall@1")


def summary_line(report: dict) -> str:
    """One line for the terminal: the headline metric per mode."""
    key = "acc1" if report["task"] == "zeroshot_classification" else "text_retrieval_recall@1"
    parts = " ".join(f"{mode}={report['metrics'][mode][key]:.4f}" for mode in MODES)
    return f"{report['dataset']} [{report['split']}, n={report['n_images']}] {report['task']} {key}: {parts}"


def evaluate(model, dataset, split: str = "test", calibration=None, out: str | os.PathLike | None = None,
             plots_dir: str | os.PathLike | None = None, task: str = "zeroshot_classification",
             n: int | None = None, batch_size: int = 32, progress: bool = True,
             workers: int | None = None, bank=None) -> dict | None:
    """Metrics for off / static / dynamic on `split`, written to `out` (atomic JSON) and PNGs in `plots_dir`.

    `calibration`: a calibration JSON path or dict (refused if made for another model or on this split);
    without it the defaults (last of 3 buckets, static layer its middle candidate, alpha 0.1).
    `workers`: image decode processes (None: the spare cores; 0: decode in this process).
    `bank`: a precomputed TextBank (or its .safetensors / .npy path) for classification, e.g. for a
    model whose text tower is not available offline; rows are matched to the class names.
    Under torchrun rank 0 returns the report, the other ranks None.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    dataset = as_dataset(dataset, split, n)
    if task not in dataset.tasks:
        raise ValueError(f"dataset {dataset.name!r} supports tasks {list(dataset.tasks)}, not {task!r}")
    calibration_report = None if calibration is None else read_calibration(calibration)
    if calibration_report is not None:
        check_calibration(calibration_report, model, dataset)
    if bank is not None and task != "zeroshot_classification":
        raise ValueError("bank is used for classification only; retrieval encodes the dataset's captions")
    bank_source = bank if isinstance(bank, (str, os.PathLike)) or bank is None else "TextBank"
    if isinstance(bank, (str, os.PathLike)):
        bank = load_text_bank(bank)
    points = mode_points(model.readout.num_layers, calibration_report)
    embeddings = embed_dataset(model, dataset, batch_size, progress, workers)
    if embeddings is None:
        return None
    run = _classification if task == "zeroshot_classification" else _retrieval
    metrics, lens = run(model, dataset, embeddings, points, bank)
    report = {"dataset": dataset.name, "model": model.model_id, "task": task, "split": dataset.split,
              "n_images": len(embeddings.ids), "skipped": [list(s) for s in embeddings.skipped],
              "calibration": None if calibration is None or isinstance(calibration, dict) else str(calibration),
              "bank": str(bank_source) if bank_source is not None else None,
              "modes": points, "metrics": metrics, "layer_lens": lens}
    if plots_dir is not None:
        from siglip_dola.evaluation.plots import plot_layer_lens
        report["plots"] = [str(p) for p in plot_layer_lens(report, plots_dir)]
    if out is not None:
        write_json_atomic(out, report)
    return report
