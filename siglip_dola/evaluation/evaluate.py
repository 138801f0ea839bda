"""Evaluation on a split the calibration never saw: off / static / dynamic, paired statistics, the layer lens.

Every mode is scored on the same items; `results.py` assembles the result JSON (clip_benchmark's top-level
keys with the calibration's CHOSEN mode under `metrics`; every mode, the paired statistics against `off`,
the best single layer as a reference and the layer lens beside them), `predictions.py` the per-item rows.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from siglip_dola import scoring as runtime
from siglip_dola.evaluation.calibrate import (all_layers, as_dataset, class_logits, embed_dataset, read_calibration,
                                   score_point)
from siglip_dola.data.datasets import TASKS, EvalDataset
from siglip_dola.io import write_json_atomic
from siglip_dola.evaluation import predictions as rows_of
from siglip_dola.layers import MODES
from siglip_dola.evaluation.metrics import (classification_metrics, hits_at_k, one_hot_targets, rank_scores,
                                            retrieval_hits, retrieval_metrics)
from siglip_dola.evaluation.results import CLASSIFICATION, RETRIEVAL_METRIC, assemble_report, summary_line  # noqa: F401
from siglip_dola.scorer import choose_layers


def _same_dataset(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_calibration(calibration: dict, model, dataset: EvalDataset, task: str = "zeroshot_classification") -> None:
    """Refuse a calibration made for another model, or on the very split being evaluated."""
    if calibration.get("task", task) != task:
        raise ValueError(f"calibration was made for task {calibration['task']!r}, not {task!r}: run "
                         f"`siglip-dola calibrate --task ...` for this task, or pass --calibration none")
    if calibration["model"] != model.model_id:
        raise ValueError(f"calibration was made for model {calibration['model']!r}, not {model.model_id!r}")
    if _same_dataset(calibration["dataset"], dataset.name) and calibration["split"] == dataset.split:
        raise ValueError(f"calibration used split {calibration['split']!r} of dataset {calibration['dataset']!r}, "
                         "the split being evaluated: evaluate on a split the calibration never saw (e.g. calibrate on val, "
                         "evaluate on test), or pass --calibration none")


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
                        "contrast_weight": None if mode == "off" else float(choice.get("contrast_weight", 1.0)),
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


@dataclass
class TaskScores:
    """Everything scored on one split: {mode: metrics}, {mode: per-item 0/1 outcome of `metric`} (paired
    statistics), the best single layer's metrics and outcome (None without one), the layer lens, the rows."""
    metric: str
    metrics: dict
    outcomes: dict
    reference: dict | None
    lens: dict
    rows: list[dict] | None


def _single_layer(calibration: dict | None, num_layers: int) -> int | None:
    """The calibration's best single layer (a candidate 1..N-1), or None when it records none."""
    layer = ((calibration or {}).get("best_single_layer") or {}).get("layer")
    if layer is None:
        return None
    if not 1 <= int(layer) < num_layers:
        raise ValueError(f"calibration's best_single_layer {layer} is not a layer 1..{num_layers - 1} of this model")
    return int(layer)


def _classification(model, dataset, embeddings, points, single_layer, want_rows) -> TaskScores:
    cache = class_logits(model, dataset, embeddings)
    results = {mode: score_point(cache.final, cache.layers, point) for mode, point in points.items()}
    targets = one_hot_targets(cache.labels, cache.final.shape[-1])  # (n, C)
    rankings = {mode: rank_scores(r) for mode, r in results.items()}
    reference = None
    if single_layer is not None:
        alone = cache.layers[single_layer - 1]  # (n, C) log q_j: layer j read out alone
        reference = {"layer": single_layer, "metrics": classification_metrics(alone, cache.labels),
                     "outcome": hits_at_k(alone, targets, 1)}
    rows = None if not want_rows else rows_of.classification_rows(
        embeddings.ids, embeddings.indices, cache.labels, dataset.classnames, results, points)
    return TaskScores("acc1", {mode: classification_metrics(r, cache.labels) for mode, r in rankings.items()},
                      {mode: hits_at_k(r, targets, 1) for mode, r in rankings.items()}, reference,
                      layer_lens(cache.final, cache.layers, targets, results["dynamic"], "acc1"), rows)


def _text_embeds(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Raw text embeddings [T, D] fp32 cpu."""
    if model.encode_text is None:
        raise ValueError(f"model {model.model_id!r} has no text tower: retrieval needs one")
    with torch.inference_mode():
        return torch.cat([model.encode_text(texts[i:i + batch_size]).float().cpu()
                          for i in range(0, len(texts), batch_size)])


def _retrieval(model, dataset, embeddings, points, single_layer, want_rows, metric) -> TaskScores:
    captions = [dataset.captions[i] for i in embeddings.indices]
    texts = [c for caps in captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.int64)  # (T,)
    if not texts:
        raise ValueError(f"dataset {dataset.name!r} has no captions: retrieval needs image-caption pairs")
    text = _text_embeds(model, texts)
    i2t_final = runtime.build_log_probs_from_rep(embeddings.z_final, text, model.tau)  # (I, T)
    i2t_layers = runtime.build_log_probs_from_rep(embeddings.z_layers, text, model.tau)  # (N-1, I, T)
    t2i_final = runtime.build_log_probs_from_rep(text, embeddings.z_final, model.tau)  # (T, I)
    t2i_layers = torch.stack([runtime.build_log_probs_from_rep(text, z_j, model.tau)
                              for z_j in embeddings.z_layers])  # (N-1, T, I)
    metrics, outcomes, t2i_results, dynamic = {}, {}, {}, None
    for mode, point in points.items():
        i2t, t2i = score_point(i2t_final, i2t_layers, point), score_point(t2i_final, t2i_layers, point)
        hits = retrieval_hits(rank_scores(i2t), rank_scores(t2i), text_image)
        metrics[mode] = retrieval_metrics(hits)
        outcomes[mode], t2i_results[mode] = hits[metric], t2i
        dynamic = i2t if mode == "dynamic" else dynamic
    reference = None
    if single_layer is not None:
        hits = retrieval_hits(i2t_layers[single_layer - 1], t2i_layers[single_layer - 1], text_image)
        reference = {"layer": single_layer, "metrics": retrieval_metrics(hits), "outcome": hits[metric]}
    rows = None if not want_rows else rows_of.retrieval_rows(texts, text_image, embeddings.ids, t2i_results, points)
    targets = one_hot_targets(text_image, len(captions)).T  # (I, T)
    return TaskScores(metric, metrics, outcomes, reference,
                      layer_lens(i2t_final, i2t_layers, targets, dynamic, "text_retrieval_recall@1"), rows)


def default_calibration(model, calibration, task: str):
    """(name recorded in the results, report dict or None): a path, a dict, "embedded" (the shipped one),
    "none"; None means the model's own default (the embedded model's shipped calibration), else none."""
    if calibration is None:
        calibration = getattr(model, "calibration", None) or ("embedded" if model.model_id == "embedded" else None)
    if calibration is None or str(calibration) == "none":
        return None, None
    if isinstance(calibration, dict):
        return calibration.get("path"), read_calibration(calibration)
    path = Path(calibration)
    if str(calibration) == "embedded":
        from siglip_dola.loading import embedded
        path = (getattr(embedded, "EMBEDDED_RETRIEVAL_CALIBRATION", None) if task != CLASSIFICATION
                else embedded.EMBEDDED_CALIBRATION)
        if path is None or not path.is_file():
            return None, None  # no shipped calibration for this task: uncalibrated, chosen mode off
    if not path.is_file():
        raise FileNotFoundError(f"--calibration {str(calibration)!r}: no such file; give a JSON written by "
                                "`siglip-dola calibrate`, 'embedded' or 'none'")
    return ("embedded" if str(calibration) == "embedded" else str(path)), read_calibration(path)


def evaluate(model, dataset, split: str = "test", calibration=None, out: str | os.PathLike | None = None,
             plots_dir: str | os.PathLike | None = None, task: str = CLASSIFICATION,
             n: int | None = None, batch_size: int = 32, progress: bool = True,
             predictions: str | os.PathLike | None = None, n_resamples: int = 10_000, seed: int = 0) -> dict | None:
    """Result JSON (results.assemble_report) for off / static / dynamic on `split`, written to `out` (atomic),
    per-item rows to `predictions` (atomic JSONL), layer-lens PNGs to `plots_dir`.

    `calibration`: path, dict, "embedded" or "none"; None: the model's default (the embedded model's shipped
    one). Refused if made for another model or on this split. The calibration's choice is the chosen mode
    (`off` without a calibration). Under torchrun rank 0 returns the report, the other ranks None.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    dataset = as_dataset(dataset, split, n)
    if task not in dataset.tasks:
        raise ValueError(f"dataset {dataset.name!r} supports tasks {list(dataset.tasks)}, not {task!r}")
    name, calibration_report = default_calibration(model, calibration, task)
    if calibration_report is not None:
        check_calibration(calibration_report, model, dataset, task)
    points = mode_points(model.readout.num_layers, calibration_report)
    single_layer = _single_layer(calibration_report, model.readout.num_layers)
    embeddings = embed_dataset(model, dataset, batch_size, progress)
    if embeddings is None:
        return None
    want_rows = predictions is not None
    if task == CLASSIFICATION:
        scored = _classification(model, dataset, embeddings, points, single_layer, want_rows)
    else:
        metric = (calibration_report or {}).get("metric") or RETRIEVAL_METRIC
        scored = _retrieval(model, dataset, embeddings, points, single_layer, want_rows, metric)
    report = assemble_report(model.model_id, dataset, task, embeddings, points, scored, calibration_report, name,
                             predictions=None if predictions is None else str(predictions),
                             n_resamples=n_resamples, seed=seed)
    if predictions is not None:
        rows_of.write_predictions(predictions, scored.rows)
    if plots_dir is not None:
        from siglip_dola.evaluation.plots import plot_layer_lens
        report["plots"] = [str(p) for p in plot_layer_lens(report, plots_dir)]
    if out is not None:
        write_json_atomic(out, report)
    return report
