"""Evaluation on a split the calibration never saw: off / static / dynamic, paired statistics, the layer lens.

Every mode is scored on the same items; `results.py` assembles the result JSON (clip_benchmark's top-level
keys with the calibration's CHOSEN mode under `metrics`; every mode, the paired statistics against `off`,
the best single layer as a reference and the layer lens beside them), `predictions.py` the per-item rows.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from siglip_dola import scoring
from siglip_dola.evaluation.calibrate import read_calibration
from siglip_dola.evaluation.split_logits import (as_dataset, caption_pairs, class_logits, embed_dataset, text_embeds,
                                                 text_to_image_logits)
from siglip_dola.evaluation.layer_logits import LayerLogits, score_modes
from siglip_dola.data.eval_dataset import EvalDataset
from siglip_dola.data.gpu_decode import check_decode
from siglip_dola.io import write_json_atomic
from siglip_dola.evaluation import predictions as rows_of
from siglip_dola.evaluation.metrics import (classification_metrics, hits_at_k, one_hot_targets, rank_scores,
                                            retrieval_hits, retrieval_metrics)
from siglip_dola.evaluation.results import assemble_report
from siglip_dola.modes import BASELINE, MODES
from siglip_dola.settings import NO_CALIBRATION, DoLaSettings, read_calibration_file, resolve_settings
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL_METRIC, TASKS
from siglip_dola.text_bank.files import load_text_bank


def _same_dataset(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def check_calibration(calibration: dict, model, dataset: EvalDataset, task: str = CLASSIFICATION) -> None:
    """Refuse a calibration made for another model, or on the very split being evaluated."""
    if calibration.get("task", task) != task:
        raise ValueError(f"calibration was made for task {calibration['task']!r}, not {task!r}: run "
                         f"`siglip-dola calibrate --task ...` for this task, or pass calibration='none'")
    if calibration["model"] != model.model_id:
        raise ValueError(f"calibration was made for model {calibration['model']!r}, not {model.model_id!r}")
    if _same_dataset(calibration["dataset"], dataset.name) and calibration["split"] == dataset.split:
        raise ValueError(f"calibration used split {calibration['split']!r} of dataset {calibration['dataset']!r}, "
                         "the split being evaluated: evaluate on a split the calibration never saw (e.g. calibrate on val, "
                         "evaluate on test), or pass calibration='none'")


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
        check_calibration(report, model, dataset, task)
    except ValueError as err:
        if not implicit:
            raise
        print(f"siglip-dola eval: not using the default calibration {name!r}: {err}", file=sys.stderr)
        return None, None
    return name, report


def mode_points(num_layers: int, calibration: dict | None) -> dict[str, DoLaSettings]:
    """{mode: DoLaSettings} for every mode of the table: the calibration's best of each mode, else the defaults
    (both through siglip_dola.settings, the one policy). The mode's source is the calibration's for the mode it
    chose, else "default"; the baseline reads no layer and has no alpha or lambda."""
    chosen = BASELINE if calibration is None else calibration["choice"]["mode"]
    points = {}
    for mode in MODES:
        settings = resolve_settings(num_layers, mode=mode, calibration=calibration, warn=False)
        settings = replace(settings, sources={**settings.sources, "mode": "calibration" if calibration is not None
                                              and mode == chosen else "default"})
        if mode == BASELINE:
            settings = replace(settings, layers=[], alpha=None, contrast_weight=None, bucket=None, n_buckets=None)
        points[mode] = settings
    return points


def layer_lens(cache: LayerLogits, targets: torch.Tensor, dynamic: scoring.DoLaResult, metric: str) -> dict:
    """Top-1 of each layer alone (targets [n, C] bool), dynamic mode's chosen-layer counts and mean
    JSD(q_N || q_j) per layer j; the layers' log-probs are computed chunk by chunk (layer_logits.py)."""
    num_layers, final = cache.num_layers, cache.final
    hits, jsd = [], []
    for rows, chunk_final, stack in cache.iter_chunks():
        hits.append(torch.stack([hits_at_k(stack[j], targets[rows], 1) for j in range(num_layers - 1)]))  # (N-1, r)
        jsd.append(scoring.dola(chunk_final, stack, list(range(1, num_layers)), mode=BASELINE).jsd)  # (N-1, r)
    top1 = [float(row.float().mean()) for row in torch.cat(hits, dim=1)]
    baseline = float(hits_at_k(final, targets, 1).float().mean())
    jsd_table = torch.cat(jsd, dim=1)  # (N-1, n)
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


def _classification(model, dataset, embeddings, points, single_layer, want_rows, bank=None) -> TaskScores:
    cache = class_logits(model, dataset, embeddings, bank)
    results = score_modes(cache, points)
    targets = one_hot_targets(cache.labels, cache.final.shape[-1])  # (n, C)
    rankings = {mode: rank_scores(r) for mode, r in results.items()}
    reference = None
    if single_layer is not None:
        alone = _layer_alone(cache, single_layer)  # (n, C) log q_j: layer j read out alone
        reference = {"layer": single_layer, "metrics": classification_metrics(alone, cache.labels),
                     "outcome": hits_at_k(alone, targets, 1)}
    rows = None if not want_rows else rows_of.classification_rows(
        embeddings.ids, embeddings.indices, cache.labels, dataset.classnames, results, points)
    return TaskScores("acc1", {mode: classification_metrics(r, cache.labels) for mode, r in rankings.items()},
                      {mode: hits_at_k(r, targets, 1) for mode, r in rankings.items()}, reference,
                      layer_lens(cache, targets, results["dynamic"], "acc1"), rows)


def _layer_alone(cache: LayerLogits, layer: int) -> torch.Tensor:
    """[n, C] log-probs of one layer read out alone (the same computation as the cache's chunks)."""
    if cache.column_layers is None:
        return scoring.build_log_probs_from_rep(cache.row_layers[layer - 1], cache.columns, cache.tau)
    return scoring.build_log_probs_from_rep(cache.rows, cache.column_layers[layer - 1], cache.tau)


def _retrieval(model, dataset, embeddings, points, single_layer, want_rows, metric) -> TaskScores:
    texts, text_image = caption_pairs(dataset, embeddings)  # (T,) image of each caption
    text = text_embeds(model, texts)
    i2t_final = scoring.build_log_probs_from_rep(embeddings.z_final, text, model.tau)  # (I, T)
    i2t = LayerLogits(i2t_final, None, embeddings, model.tau, row_layers=embeddings.z_layers, columns=text)
    t2i = text_to_image_logits(model, text, text_image, embeddings)
    i2t_results, t2i_results = score_modes(i2t, points), score_modes(t2i, points)
    hits = {mode: retrieval_hits(rank_scores(i2t_results[mode]), rank_scores(t2i_results[mode]), text_image)
            for mode in points}
    reference = None
    if single_layer is not None:
        alone = retrieval_hits(_layer_alone(i2t, single_layer), _layer_alone(t2i, single_layer), text_image)
        reference = {"layer": single_layer, "metrics": retrieval_metrics(alone), "outcome": alone[metric]}
    rows = None if not want_rows else rows_of.retrieval_rows(texts, text_image, embeddings.ids, t2i_results, points)
    targets = one_hot_targets(text_image, len(embeddings.ids)).T  # (I, T)
    return TaskScores(metric, {mode: retrieval_metrics(h) for mode, h in hits.items()},
                      {mode: h[metric] for mode, h in hits.items()}, reference,
                      layer_lens(i2t, targets, i2t_results["dynamic"], "text_retrieval_recall@1"), rows)


def evaluate(model, dataset, split: str | None = None, calibration=None, out: str | os.PathLike | None = None,
             plots_dir: str | os.PathLike | None = None, task: str = CLASSIFICATION,
             n: int | None = None, batch_size: int = 32, progress: bool = True,
             predictions: str | os.PathLike | None = None, n_resamples: int = 10_000, seed: int = 0,
             workers: int | None = None, bank=None, decode: str = "cpu") -> dict | None:
    """Result JSON (results.assemble_report) for off / static / dynamic on `split`, written to `out` (atomic),
    per-item rows to `predictions` (atomic JSONL), layer-lens PNGs to `plots_dir`.

    `calibration`: path, dict, "embedded" or "none"; None: the model's default (the embedded model's shipped
    one; left out, with a line on stderr, when made on this split). An explicit one made for another model or
    on this split is refused. The calibration's choice is the chosen mode (`off` without a calibration).
    `workers`: image decode processes (None: the spare cores; 0: decode in this process).
    `decode`: "cpu" (PIL in the workers, the default) or "gpu" (nvJPEG on the model's CUDA device; the pixels agree
    closely with PIL's, not exactly: docs/evaluation.md); the report records it.
    `bank`: a precomputed TextBank (or its .safetensors / .npy path) for classification, e.g. for a
    model whose text tower is not available offline; rows are matched to the class names.
    Under torchrun rank 0 returns the report, the other ranks None.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_decode(decode, model.device)
    dataset = as_dataset(dataset, split, n)
    if task not in dataset.tasks:
        raise ValueError(f"dataset {dataset.name!r} supports tasks {list(dataset.tasks)}, not {task!r}")
    name, calibration_report = _calibration_for(model, dataset, calibration, task)
    # the design note's defaults apply to the DoLa modes without a calibration: say so once, on stderr
    resolve_settings(model.readout.num_layers, calibration=calibration_report, model_id=model.model_id, task=task)
    if bank is not None and task != CLASSIFICATION:
        raise ValueError("bank is used for classification only; retrieval encodes the dataset's captions")
    bank_source = bank if isinstance(bank, (str, os.PathLike)) or bank is None else "TextBank"
    if isinstance(bank, (str, os.PathLike)):
        bank = load_text_bank(bank, rows_in_class_order=True)  # rows are matched to the dataset's class names
    points = mode_points(model.readout.num_layers, calibration_report)
    single_layer = _single_layer(calibration_report, model.readout.num_layers)
    embeddings = embed_dataset(model, dataset, batch_size, progress, workers, decode)
    if embeddings is None:
        return None
    want_rows = predictions is not None
    if task == CLASSIFICATION:
        scored = _classification(model, dataset, embeddings, points, single_layer, want_rows, bank)
    else:
        metric = (calibration_report or {}).get("metric") or RETRIEVAL_METRIC
        scored = _retrieval(model, dataset, embeddings, points, single_layer, want_rows, metric)
    report = assemble_report(model.model_id, dataset, task, embeddings, points, scored, calibration_report, name,
                             predictions=None if predictions is None else str(predictions),
                             n_resamples=n_resamples, seed=seed)
    report["model_sources"] = dict(model.sources)   # where vision, head, text and logit scale came from
    report["decode"] = decode
    if bank_source is not None:
        report["bank"] = str(bank_source)
    if predictions is not None:
        rows_of.write_predictions(predictions, scored.rows)
    if plots_dir is not None:
        from siglip_dola.evaluation.plots import plot_layer_lens
        report["plots"] = [str(p) for p in plot_layer_lens(report, plots_dir)]
    if out is not None:
        write_json_atomic(out, report)
    return report
