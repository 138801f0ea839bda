"""Calibration: choose mode, bucket / static layer and alpha by top-1 accuracy on a validation split.

Images go through the model once (all layers 1..N-1 in one readout call per batch); every grid point
is then scored from the cached per-layer logits with `runtime.dola`, never by running the model again.
Ties go to the baseline (`off`), then to fewer layers, then to the earlier grid point.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from siglip_dola import scoring as runtime
from siglip_dola.data.datasets import EvalDataset, load_dataset
from siglip_dola.evaluation.embed import Embeddings, embed_images
from siglip_dola.io import write_json_atomic
from siglip_dola.layers import resolve_layers
from siglip_dola.evaluation.metrics import classification_metrics, rank_scores
from siglip_dola.text_bank import TextBank, bank_for_classes, build_text_bank


@dataclass
class CalibrationGrid:
    """The searched values: buckets of each split in n_buckets (candidate layers of `parity`), static
    layers of `static_parity` ("even" | "all"), and alphas. The baseline `off` is always a candidate."""
    n_buckets: tuple[int, ...] = (2, 3, 4)
    parity: str = "even"
    static_parity: str = "even"
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2)


@dataclass
class LayerLogits:
    """Cached scores: final [n, C] and layers [N-1, n, C] (row j-1 is layer j) as log-probs, labels [n]."""
    final: torch.Tensor
    layers: torch.Tensor
    labels: torch.Tensor
    embeddings: Embeddings


def all_layers(model) -> list[int]:
    """Every candidate layer 1..N-1 of the model."""
    return list(range(1, model.readout.num_layers))


def as_dataset(dataset, split: str, n: int | None) -> EvalDataset:
    """An EvalDataset from a dataset object or a name/path accepted by datasets.load_dataset."""
    return dataset if isinstance(dataset, EvalDataset) else load_dataset(dataset, split=split, n=n)


def embed_dataset(model, dataset: EvalDataset, batch_size: int = 32, progress: bool = True,
                  workers: int | None = None) -> Embeddings | None:
    """Embed every item with all layers 1..N-1 in one pass; None on torchrun ranks other than 0."""
    embeddings = embed_images(model, dataset.items, all_layers(model), batch_size=batch_size, progress=progress,
                              workers=workers)
    if embeddings is not None and not embeddings.ids:
        raise ValueError(f"dataset {dataset.name!r} split {dataset.split!r}: no image could be read "
                         f"({len(embeddings.skipped)} skipped)")
    return embeddings


def class_logits(model, dataset: EvalDataset, embeddings: Embeddings, bank: TextBank | None = None) -> LayerLogits:
    """Per-layer class log-probs from embeddings against the dataset's class prompts (or a precomputed `bank`)."""
    if not dataset.classnames:
        raise ValueError(f"dataset {dataset.name!r} has no class labels (classification needs path,label data)")
    bank = build_text_bank(model, dataset.classnames, dataset.templates) if bank is None else \
        bank_for_classes(bank, dataset.classnames, model)
    bank = bank.embeds.float().cpu()  # (C, D)
    final = runtime.build_log_probs_from_rep(embeddings.z_final, bank, model.tau)  # (n, C)
    layers = runtime.build_log_probs_from_rep(embeddings.z_layers, bank, model.tau)  # (N-1, n, C)
    labels = torch.tensor([dataset.labels[i] for i in embeddings.indices], dtype=torch.int64)
    if bool((labels < 0).any()):
        raise ValueError(f"dataset {dataset.name!r}: some images have no class label")
    return LayerLogits(final, layers, labels, embeddings)


def grid_points(grid: CalibrationGrid, num_layers: int) -> list[dict]:
    """Every configuration of the grid, baseline first: dicts with mode, bucket, n_buckets, layers, static_layer, alpha."""
    points = [{"mode": "off", "bucket": None, "n_buckets": None, "layers": [], "static_layer": None, "alpha": None}]
    for n_buckets in grid.n_buckets:
        for bucket in range(1, n_buckets + 1):
            try:
                layers = resolve_layers(num_layers, bucket=bucket, n_buckets=n_buckets, parity=grid.parity)
            except ValueError:  # a bucket with no candidate layer of this parity
                continue
            points += [{"mode": "dynamic", "bucket": bucket, "n_buckets": n_buckets, "layers": layers,
                        "static_layer": None, "alpha": alpha} for alpha in grid.alphas]
    static_layers = resolve_layers(num_layers, bucket=1, n_buckets=1, parity=grid.static_parity)
    points += [{"mode": "static", "bucket": None, "n_buckets": None, "layers": [layer], "static_layer": layer,
                "alpha": alpha} for layer in static_layers for alpha in grid.alphas]
    return points


def score_point(final: torch.Tensor, layers: torch.Tensor, point: dict) -> runtime.DoLaResult:
    """DoLa for one configuration from cached log-probs final [..., C], layers [N-1, ..., C] (row j-1 = layer j)."""
    if point["mode"] == "off":
        return runtime.dola(final, None, None, mode="off")
    stacked = layers[[j - 1 for j in point["layers"]]]  # (J, ..., C)
    return runtime.dola(final, stacked, point["layers"], mode=point["mode"], alpha=point["alpha"],
                        static_layer=point["static_layer"])


def _preference(indexed_score: tuple[int, dict]) -> tuple:
    """Sort key: more correct top-1 first; then the baseline; then fewer layers; then grid order."""
    index, scored = indexed_score
    return (-scored["correct1"], scored["mode"] != "off", len(scored["layers"]), index)


def choose(scores: list[dict]) -> dict:
    """The preferred scored grid point (see _preference)."""
    return min(enumerate(scores), key=_preference)[1]


def best_per_mode(scores: list[dict]) -> dict:
    """{mode: preferred scored point of that mode}."""
    return {mode: choose([s for s in scores if s["mode"] == mode]) for mode in {s["mode"] for s in scores}}


def choice_of(point: dict) -> dict:
    """The `choice` object DoLaSigLIP.from_calibration reads."""
    choice = {"mode": point["mode"]}
    if point["mode"] == "dynamic":
        choice.update(bucket=point["bucket"], n_buckets=point["n_buckets"])
    if point["mode"] == "static":
        choice["static_layer"] = point["static_layer"]
    if point["mode"] != "off":
        choice["alpha"] = point["alpha"]
    return choice


def score_grid(cache: LayerLogits, points: list[dict]) -> list[dict]:
    """Each grid point with its metrics (acc1, acc5, mean_per_class_recall) and correct1 count."""
    scores = []
    for point in points:
        result = score_point(cache.final, cache.layers, point)
        ranking = rank_scores(result)
        correct1 = int((ranking.argmax(dim=-1) == cache.labels).sum())
        scores.append({**point, **classification_metrics(ranking, cache.labels), "correct1": correct1})
    return scores


def calibrate(model, dataset, split: str = "val", grid: CalibrationGrid | None = None,
              out: str | os.PathLike | None = None, n: int | None = None, batch_size: int = 32,
              progress: bool = True, bank: TextBank | None = None) -> dict | None:
    """Search the grid on `split` of `dataset`; write the calibration JSON to `out` (atomically) and return it.

    `bank`: a precomputed TextBank for the class names (see evaluate); default: built with the model's text tower.

    Under torchrun, every rank embeds its shard; rank 0 scores, writes and returns, the others return None.
    """
    grid = grid or CalibrationGrid()
    dataset = as_dataset(dataset, split, n)
    embeddings = embed_dataset(model, dataset, batch_size, progress)
    if embeddings is None:
        return None
    cache = class_logits(model, dataset, embeddings, bank)
    scores = score_grid(cache, grid_points(grid, model.readout.num_layers))
    chosen = choose(scores)
    report = {"model": model.model_id, "dataset": dataset.name, "split": dataset.split,
              "task": "zeroshot_classification", "n_images": len(embeddings.ids),
              "skipped": [list(s) for s in embeddings.skipped], "num_layers": model.readout.num_layers,
              "tau": model.tau, "grid": asdict(grid), "scores": scores,
              "best": {mode: choice_of(point) for mode, point in best_per_mode(scores).items()},
              "choice": choice_of(chosen), "choice_metrics": {k: chosen[k] for k in
                                                              ("acc1", "acc5", "mean_per_class_recall")}}
    if out is not None:
        write_json_atomic(out, report)
    return report


def read_calibration(path_or_report) -> dict:
    """A calibration report from a JSON path (or the dict itself), with its model, dataset, split and choice checked."""
    if isinstance(path_or_report, dict):
        report = path_or_report
    else:
        report = json.loads(Path(path_or_report).read_text(encoding="utf-8"))
    missing = [k for k in ("model", "dataset", "split", "choice") if k not in report]
    if missing:
        raise ValueError(f"calibration {str(path_or_report)[:200]!r} lacks keys {missing}; "
                         "write it with `siglip-dola calibrate`")
    return report
