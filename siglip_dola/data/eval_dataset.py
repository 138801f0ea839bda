"""The EvalDataset record every loader returns, taking a part of one, and the clip_benchmark import seam.

Loaders live beside it: datasets.py (names, folders, CSVs, clip_benchmark classification sets),
clip_benchmark_retrieval.py (flickr30k, flickr8k, mscoco_captions), webdataset_shards.py (`wds:` shards).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from siglip_dola.tasks import CLASSIFICATION

CLIP_BENCHMARK_HINT = "install it with `pip install 'siglip-dola[clip_benchmark]'` (or `pip install clip-benchmark`)"


class MissingDependencyError(ImportError, RuntimeError):
    """An optional dependency is needed (RuntimeError too, so the CLI prints it as an error line)."""


@dataclass
class EvalDataset:
    """items [n] (paths or (id, PIL image) pairs), labels [n] (class index, -1 when the set has none),
    classnames [C], templates ("{}" marks the class name), captions [n][k] for image-caption sets.

    Lazy item sequences (a torchvision dataset, webdataset shards) have `take(positions)`, which returns
    the same kind of sequence over those positions without reading any image."""
    name: str
    split: str
    items: Sequence
    labels: list[int]
    classnames: list[str]
    templates: list[str]
    captions: list[list[str]] | None = None
    tasks: tuple[str, ...] = (CLASSIFICATION,)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def take(dataset: EvalDataset, positions: Sequence[int], split: str | None = None) -> EvalDataset:
    """The items at `positions` (with their labels and captions) as a new EvalDataset, its split renamed
    to `split` when given (a named part of a split)."""
    positions = list(positions)
    items = dataset.items
    return replace(dataset, split=dataset.split if split is None else split,
                   items=items.take(positions) if hasattr(items, "take") else [items[i] for i in positions],
                   labels=[dataset.labels[i] for i in positions],
                   captions=None if dataset.captions is None else [dataset.captions[i] for i in positions],
                   skipped=list(dataset.skipped))


def clip_benchmark_builder(name: str):
    """clip_benchmark's `build_dataset`, or MissingDependencyError with the install hint."""
    try:  # the builder imports dependencies clip_benchmark does not declare (requests)
        import clip_benchmark.datasets  # noqa: F401
        from clip_benchmark.datasets.builder import build_dataset
    except ImportError as err:
        raise MissingDependencyError(f"clip_benchmark dataset {name!r} needs the {err.name or err} package: "
                                     f"{CLIP_BENCHMARK_HINT}") from err
    return build_dataset
