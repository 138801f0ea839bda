"""Calibration: choose mode, bucket / static layer, alpha and contrast weight on a validation split.

Classification picks by top-1 accuracy; retrieval (``task="zeroshot_retrieval"``) picks the text -> image
rerank settings by ``image_retrieval_recall@k`` (``RETRIEVAL_METRIC``), the direction `search` serves.
Images go through the model once (split_logits.py: all layers 1..N-1 in one readout call per batch); every
grid point is then scored from the stored embeddings with `scoring.dola`, never by running the model again,
chunk by chunk (evaluation/layer_logits.py: O(n*C) memory per point). Ties go to the baseline (`off`), then to
fewer layers, then to the earlier grid point (lambda = 1, the design note's formula, comes first). The
baseline is a grid point, so the chosen settings never score below `off` on the calibration split.
The best single layer read out alone (not DoLa) is reported as ``best_single_layer``.

Calibration JSON: {"model", "dataset", "split", "task", "n_images", "num_layers", "tau", "grid",
"scores": [grid point + metrics], "best": {mode: choice}, "choice": {"mode", "bucket", "n_buckets",
"static_layer", "alpha", "contrast_weight"}, "choice_metrics", "metric",
"best_single_layer": {"layer", <metric>: value}}; read by siglip_dola.settings.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from siglip_dola import distributed
from siglip_dola.data.gpu_decode import check_decode
from siglip_dola.evaluation.layer_logits import LayerLogits, score_point
from siglip_dola.evaluation.metrics import mean_per_class_recall, rank_scores
from siglip_dola.evaluation.split_logits import as_dataset, embed_dataset, task_logits
from siglip_dola.io import write_json_atomic
from siglip_dola.layers import checked_layers, resolve_layers
from siglip_dola.modes import BASELINE, CONTRASTING, MODES
from siglip_dola.settings import DoLaSettings
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL, RETRIEVAL_METRIC
from siglip_dola.text_bank.bank import TextBank


@dataclass
class CalibrationGrid:
    """The searched values: buckets of each split in n_buckets (candidate layers of `parity`), static
    layers of `static_parity` ("even" | "all"), and alphas. The baseline `off` is always a candidate."""
    n_buckets: tuple[int, ...] = (2, 3, 4)
    parity: str = "even"
    static_parity: str = "even"
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2)
    contrast_weights: tuple[float, ...] = (1.0, 0.5, 0.25)  # lambda; grid order breaks ties: 1 first

    def __post_init__(self):  # an empty axis would leave `off` alone to "choose" from
        for name in ("n_buckets", "alphas", "contrast_weights"):
            if len(tuple(getattr(self, name))) == 0:
                raise ValueError(f"{name} is empty: give at least one value to search")


def grid_points(grid: CalibrationGrid, num_layers: int) -> list[DoLaSettings]:
    """Every configuration of the grid as DoLaSettings, baseline first, then each mode of the table that
    contrasts: a fixed-layer mode per static layer, the others per bucket (sources: "grid")."""
    def point(mode, layers, static_layer=None, alpha=None, weight=None, bucket=None, n_buckets=None):
        return DoLaSettings(mode=mode, layers=layers, static_layer=static_layer, alpha=alpha, contrast_weight=weight,
                            bucket=bucket, n_buckets=n_buckets,
                            sources=dict.fromkeys(("mode", "layers", "alpha", "contrast_weight"), "grid"))
    points = [point(BASELINE, [])]
    buckets = []
    for n_buckets in grid.n_buckets:
        for bucket in range(1, n_buckets + 1):
            try:
                buckets.append((bucket, n_buckets, resolve_layers(num_layers, bucket=bucket, n_buckets=n_buckets,
                                                                  parity=grid.parity)))
            except ValueError:  # a bucket with no candidate layer of this parity
                continue
    parity = grid.static_parity if num_layers > 2 else "all"  # N=2: layer 1, odd, is the only candidate
    static_layers = resolve_layers(num_layers, bucket=1, n_buckets=1, parity=parity)
    for mode in sorted(CONTRASTING, key=lambda name: MODES[name].fixed_layer):  # per-bucket modes first
        if MODES[mode].fixed_layer:
            points += [point(mode, checked_layers([layer], num_layers), layer, alpha, weight)
                       for weight in grid.contrast_weights for layer in static_layers for alpha in grid.alphas]
        else:
            points += [point(mode, layers, None, alpha, weight, bucket, n_buckets)
                       for bucket, n_buckets, layers in buckets
                       for weight in grid.contrast_weights for alpha in grid.alphas]
    return points


def _preference(indexed_score: tuple[int, dict]) -> tuple:
    """Sort key: more correct (top-1, or retrieval hits at the metric's k) first; then the baseline; then
    fewer layers; then grid order."""
    index, scored = indexed_score
    return (-scored["correct"], scored["mode"] != BASELINE, len(scored["layers"]), index)


def choose(scores: list[dict]) -> dict:
    """The preferred scored grid point (see _preference)."""
    return min(enumerate(scores), key=_preference)[1]


def best_per_mode(scores: list[dict]) -> dict:
    """{mode: preferred scored point of that mode}."""
    return {mode: choose([s for s in scores if s["mode"] == mode]) for mode in {s["mode"] for s in scores}}


def choice_of(point: dict) -> dict:
    """The `choice` object DoLaSigLIP.from_calibration reads (from a scored point: DoLaSettings.to_json() + metrics)."""
    choice = {"mode": point["mode"]}
    if point.get("bucket") is not None:
        choice.update(bucket=point["bucket"], n_buckets=point["n_buckets"])
    if MODES[point["mode"]].fixed_layer:
        choice["static_layer"] = point["static_layer"]
    if point["mode"] != BASELINE:
        choice["alpha"] = point["alpha"]
        choice["contrast_weight"] = point.get("contrast_weight", 1.0)
    return choice


class _Hits:
    """Per-row hits of one ranking at each k, filled chunk by chunk (O(n) per point). The buffers are
    allocated once: small long-lived tensors made between the chunks' large temporaries fragment the heap
    (measured: 9 GB instead of 0.8 GB peak RSS at 50k x 1000 x 23, benchmarks/calibration_memory.py)."""

    def __init__(self, ks: tuple[int, ...], n: int):
        self.ks = ks
        self.hits = {k: torch.zeros(n, dtype=torch.bool) for k in ks}
        self.top1 = torch.zeros(n, dtype=torch.int64)

    def add(self, scores: torch.Tensor, labels: torch.Tensor, rows: slice) -> None:
        """scores [r, C] ranking scores of `rows`, labels [r] the target column per row; one stable sort for
        every k (the order metrics.hits_at_k uses: ties go to the lower index)."""
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :max(self.ks)]  # (r, k)
        correct = order == labels[:, None]  # (r, k)
        for k in self.ks:
            self.hits[k][rows] = correct[:, :k].any(dim=-1)
        self.top1[rows] = order[:, 0]

    def classification(self, labels: torch.Tensor) -> dict:
        """{acc1, acc5, mean_per_class_recall, correct1, correct} as metrics.classification_metrics computes them."""
        hit1, hit5 = self.hits[1], self.hits[5]
        correct = int(hit1.sum())
        return {"acc1": float(hit1.float().mean()), "acc5": float(hit5.float().mean()),
                "mean_per_class_recall": mean_per_class_recall(self.top1, labels),
                "correct1": correct, "correct": correct}

    def retrieval(self, metric: str) -> dict:
        """{image_retrieval_recall@k for each k, correct: hits at the metric's k}."""
        hits = self.hits
        metrics = {f"image_retrieval_recall@{k}": float(h.float().mean()) for k, h in hits.items()}
        return {**metrics, "correct": int(hits[int(metric.rsplit("@", 1)[1])].sum())}


def _ks(task: str, metric: str) -> tuple[int, ...]:
    return (1, 5) if task == CLASSIFICATION else tuple(sorted({1, 5, 10, int(metric.rsplit("@", 1)[1])}))


def score_grid(cache: LayerLogits, points: list[dict], task: str = CLASSIFICATION,
               metric: str = RETRIEVAL_METRIC) -> tuple[list[dict], list[dict]]:
    """(each grid point with its metrics and `correct` count, each layer 1..N-1 read out alone likewise).

    One pass over the row chunks: every point and every single layer is scored on each chunk."""
    n = cache.final.shape[0]
    hits = [_Hits(_ks(task, metric), n) for _ in points]
    singles = [_Hits(_ks(task, metric), n) for _ in range(cache.num_layers - 1)]
    for rows, final, stack in cache.iter_chunks():
        labels = cache.labels[rows]
        for point, collected in zip(points, hits):
            collected.add(rank_scores(score_point(final, stack, point)), labels, rows)
        for j, collected in enumerate(singles):
            collected.add(stack[j], labels, rows)  # log q_j: layer j+1 alone
    done = (lambda h: h.classification(cache.labels)) if task == CLASSIFICATION else (lambda h: h.retrieval(metric))
    layers = [{"layer": j, **done(h)} for j, h in enumerate(singles, start=1)]
    return [{**point.to_json(), **done(h)} for point, h in zip(points, hits)], layers


def best_single_layer(layers: list[dict], key: str) -> dict:
    """{"layer": j, key: value} of the best layer alone (ties: the deeper layer, nearer the model's own)."""
    best = max(layers, key=lambda scored: (scored["correct"], scored["layer"]))
    return {"layer": best["layer"], key: best[key]}


def calibrate(model, dataset, split: str | None = None, grid: CalibrationGrid | None = None,
              out: str | os.PathLike | None = None, n: int | None = None, batch_size: int = 32,
              progress: bool = True, task: str = CLASSIFICATION, metric: str = RETRIEVAL_METRIC,
              bank: TextBank | None = None, workers: int | None = None, decode: str = "cpu") -> dict | None:
    """Search the grid on `split` of `dataset`; write the calibration JSON to `out` (atomically) and return it.

    task "zeroshot_retrieval" picks by `metric` (image_retrieval_recall@k, text -> image) over the captions.
    `bank`: a precomputed TextBank for the class names (see evaluate); default: built with the model's text tower.
    `workers`, `decode`: image decode processes and where JPEGs are decoded ('cpu' or 'gpu'), as in evaluate.
    Under torchrun, every rank embeds its shard; rank 0 scores, writes and returns, the others return None.
    """
    if task not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(f"task must be one of {(CLASSIFICATION, RETRIEVAL)}, got {task!r}")
    if not (isinstance(metric, str) and metric.startswith("image_retrieval_recall@")
            and metric.rsplit("@", 1)[1].isdigit() and int(metric.rsplit("@", 1)[1]) >= 1):
        raise ValueError(f"metric must be image_retrieval_recall@K with K >= 1, got {metric!r}")
    check_decode(decode, model.device)
    grid = grid or CalibrationGrid()
    dataset = as_dataset(dataset, split, n, default_split="val")
    embeddings = embed_dataset(model, dataset, batch_size, progress, workers, decode)
    if embeddings is None:  # other ranks wait until rank 0 has written `out`: a next command may read it
        error = distributed.broadcast_from_rank0(None)
        if error:
            raise ValueError(error)
        return None
    try:
        report = _score_and_write(model, dataset, embeddings, grid, out, task, metric, bank)
    except Exception as err:
        distributed.broadcast_from_rank0(f"calibration failed on rank 0: {err}")
        raise
    distributed.broadcast_from_rank0(None)
    return report


def _score_and_write(model, dataset, embeddings, grid, out, task, metric, bank=None) -> dict:
    cache = task_logits(model, dataset, embeddings, task, bank)
    scores, layers = score_grid(cache, grid_points(grid, model.readout.num_layers), task, metric)
    chosen = choose(scores)
    key = "acc1" if task == CLASSIFICATION else metric
    metric_keys = ("acc1", "acc5", "mean_per_class_recall") if task == CLASSIFICATION else \
        tuple(k for k in chosen if k.startswith("image_retrieval_recall@"))
    report = {"model": model.model_id, "model_sources": dict(model.sources),   # where head, text, logit scale came from
              "dataset": dataset.name, "split": dataset.split,
              "task": task, "metric": key, "n_images": len(embeddings.ids),
              "skipped": [list(s) for s in embeddings.skipped], "num_layers": model.readout.num_layers,
              "tau": model.tau, "grid": asdict(grid), "scores": scores,
              "best": {mode: choice_of(point) for mode, point in best_per_mode(scores).items()},
              "choice": choice_of(chosen), "choice_metrics": {k: chosen[k] for k in metric_keys},
              "best_single_layer": best_single_layer(layers, key),
              "single_layers": [{k: v for k, v in scored.items() if k != "correct"} for scored in layers]}
    if out is not None:
        write_json_atomic(out, report)
    return report


def read_calibration(path_or_report) -> dict:
    """A calibration report from a JSON path (or the dict itself), with its model, dataset, split and choice checked."""
    if isinstance(path_or_report, dict):
        report = path_or_report
    else:
        try:
            report = json.loads(Path(path_or_report).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"calibration {str(path_or_report)!r} is not valid JSON ({err}); "
                             "write it with `siglip-dola calibrate`") from None
    if not isinstance(report, dict):
        raise ValueError(f"calibration {str(path_or_report)[:200]!r} is not a JSON object; "
                         "write it with `siglip-dola calibrate`")
    missing = [k for k in ("model", "dataset", "split", "choice") if k not in report]
    if missing:
        raise ValueError(f"calibration {str(path_or_report)[:200]!r} lacks keys {missing}; "
                         "write it with `siglip-dola calibrate`")
    return report
