"""Evaluation datasets: the embedded `shapes` set, an ImageFolder layout, a CSV of path,label, `wds:` shards,
clip_benchmark names (classification here; retrieval in clip_benchmark_retrieval.py).

Each loader returns an EvalDataset whose `items` are what `embed.embed_images` takes (image paths, or
(id, PIL image) pairs). Unreadable files are not checked here: the embedding pass reports and skips them.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Sequence

from siglip_dola.data import shapes
from siglip_dola.data.clip_benchmark_retrieval import RETRIEVAL_NAMES, retrieval_dataset
from siglip_dola.data.eval_dataset import (CLIP_BENCHMARK_HINT, EvalDataset, MissingDependencyError,
                                           clip_benchmark_builder, take)
from siglip_dola.data.images import IMAGE_EXTENSIONS
from siglip_dola.data.webdataset_shards import WDS_PREFIX, webdataset_dataset
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL, TASKS

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def evenly_spaced(dataset: EvalDataset, n: int | None) -> EvalDataset:
    """Keep n evenly spaced items (all classes of a sorted listing stay represented)."""
    n = _check_limit(n, len(dataset.items), f"dataset {dataset.name!r} split {dataset.split!r}")
    if n is None or n >= len(dataset.items):
        return dataset
    return take(dataset, [i * len(dataset.items) // n for i in range(n)])


def _check_limit(n: int | None, size: int, what: str) -> int | None:
    """n (a positive int or None) capped at the `size` items of `what`, with a warning when it was larger:
    items beyond a split are never generated or invented."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if n is not None and n > size:
        warnings.warn(f"n={n} is more than the {size} images of {what}: using all {size}", UserWarning, stacklevel=3)
        return size
    return n


def shapes_dataset(split: str = "test", n: int | None = None, seed: int = 0) -> EvalDataset:
    """The generated shapes set (36 colour x shape classes, one caption per image): the first n images of the
    split's fixed size (shapes.DEFAULT_SIZES), drawn lazily. An n beyond the split is capped with a warning:
    images past it are not part of the split."""
    if split not in shapes.SPLITS:
        raise ValueError(f"split must be one of {shapes.SPLITS} for dataset 'shapes', got {split!r}")
    size = shapes.DEFAULT_SIZES[split]
    n = _check_limit(n, size, f"the shapes {split!r} split")
    items = shapes.ShapeItems(split, seed, range(size if n is None else n))
    return EvalDataset("shapes", split, items, items.labels(), list(shapes.CLASSNAMES), list(shapes.TEMPLATES),
                       [[caption] for caption in items.captions()], tasks=TASKS)


def _prompt_name(folder_name: str) -> str:
    return folder_name.replace("_", " ")


def image_folder_dataset(root: str | os.PathLike, split: str = "test",
                         templates: Sequence[str] = DEFAULT_TEMPLATES, strict_split: bool = False) -> EvalDataset:
    """root/<split>/<class>/<images> or root/<class>/<images>; the class name is the folder name (_ -> space).

    Without a <split> folder the split is recorded as "all" (so calibrating and evaluating on the same
    folder is recognised as the same images); with `strict_split` (a split the user named) that is an error.
    """
    root = Path(root)
    base, found = (root / split, split) if (root / split).is_dir() else (root, "all")
    if strict_split and found != split and split != "all":
        raise ValueError(f"dataset folder {str(root)!r} has no split folder {split!r} ({str(root / split)!r}): "
                         "without split folders it is one split, 'all'; leave split out or pass split='all'")
    split = found
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"dataset folder {str(base)!r} has no class sub-folders (expected <root>/<class>/<image>)")
    items, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items.extend(files)
        labels.extend([label] * len(files))
    if not items:
        raise ValueError(f"dataset folder {str(base)!r} holds no image files")
    return EvalDataset(str(root), split, items, labels, [_prompt_name(p.name) for p in class_dirs], list(templates))


def csv_dataset(path: str | os.PathLike, templates: Sequence[str] = DEFAULT_TEMPLATES, split: str | None = None,
                strict_split: bool = False) -> EvalDataset:
    """A CSV with a header `path,label` (classification) or `path,caption` (retrieval; a path may repeat),
    and optionally a `split` column.

    Paths are relative to the CSV's folder. Class names are the sorted distinct labels (of all splits). With
    a `split` column the rows of `split` are kept; without one the file is one split, recorded as "all", and
    a `strict_split` (a split the user named) other than "all" is an error.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    if "path" not in columns or not columns & {"label", "caption"}:
        raise ValueError(f"CSV {str(path)!r} needs a header with 'path' and 'label' (or 'caption') columns, "
                         f"got {sorted(columns)}")
    all_labels = sorted({row["label"] for row in rows if row.get("label")})
    rows, found = _split_rows(path, rows, split, strict_split)
    images: dict[str, dict] = {}  # resolved path -> {"label", "captions"}, in first-seen order
    for row in rows:
        entry = images.setdefault(str(path.parent / row["path"]), {"label": row.get("label"), "captions": []})
        if row.get("caption"):
            entry["captions"].append(row["caption"])
    items = [Path(p) for p in images]
    classnames = all_labels  # the same classes on every split, so calibration and evaluation agree
    index_of = {name: i for i, name in enumerate(classnames)}
    labels = [index_of[e["label"]] if e["label"] else -1 for e in images.values()]
    has_captions = "caption" in columns
    return EvalDataset(str(path), found, items, labels, classnames, list(templates),
                       [e["captions"] for e in images.values()] if has_captions else None,
                       tasks=((CLASSIFICATION,) if classnames else ()) +
                       ((RETRIEVAL,) if has_captions else ()))


def _split_rows(path: Path, rows: list[dict], split: str | None, strict: bool) -> tuple[list[dict], str]:
    """(rows of `split`, the split recorded) of a CSV; its `split` column, when it has one, selects them."""
    if rows and "split" in rows[0]:
        splits = sorted({row["split"] for row in rows})
        wanted = split or "test"
        if wanted == "all":
            return rows, "all"
        kept = [row for row in rows if row["split"] == wanted]
        if not kept:
            raise ValueError(f"CSV {str(path)!r} has no rows of split {wanted!r}; its splits: {splits}")
        return kept, wanted
    if strict and split not in (None, "all"):
        raise ValueError(f"CSV {str(path)!r} has no 'split' column, so it is one split ('all'), not {split!r}: "
                         "add a split column, use one CSV per split, or leave split out")
    return rows, "all"


def _clip_benchmark_module():
    try:
        import clip_benchmark.datasets as cb_datasets
    except ImportError as err:
        raise MissingDependencyError(f"clip_benchmark datasets need the clip_benchmark package: "
                                     f"{CLIP_BENCHMARK_HINT}") from err
    return cb_datasets


def clip_benchmark_prompts(name: str, language: str = "en") -> tuple[list[str] | None, list[str]]:
    """(class names or None, templates with "{}") packaged with clip_benchmark for dataset `name`; no download.

    Class names of torchvision-backed sets (cifar10, ...) come with the data, so they are None here.
    Templates fall back to imagenet1k's, as clip_benchmark does.
    """
    package = resources.files(_clip_benchmark_module())
    try:
        classnames = json.loads((package / f"{language}_classnames.json").read_text(encoding="utf-8"))
        templates = json.loads((package / f"{language}_zeroshot_classification_templates.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"clip_benchmark has no prompts for language {language!r}") from None
    keys = [name, name.split("/", 1)[-1], "imagenet1k"]
    template_list = next(templates[k] for k in keys if k in templates)
    return classnames.get(name, classnames.get(keys[1])), [t.replace("{c}", "{}") for t in template_list]


class _LabelledPairs(Sequence):
    """(id, PIL image) pairs of a torchvision-style dataset returning (image, label), loaded lazily."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _LabelledPairs(self.dataset, self.indices[index])
        return str(self.indices[index]), self.dataset[self.indices[index]][0]

    def take(self, positions: Sequence[int]) -> "_LabelledPairs":
        return _LabelledPairs(self.dataset, [self.indices[i] for i in positions])


def clip_benchmark_dataset(name: str, split: str = "test", root: str | os.PathLike = "clip_benchmark_data",
                           language: str = "en") -> EvalDataset:
    """A clip_benchmark classification dataset by name (downloads into `root` on first use)."""
    _clip_benchmark_module()
    build_dataset = clip_benchmark_builder(name)
    from clip_benchmark.datasets.builder import get_dataset_default_task

    if get_dataset_default_task(name) != CLASSIFICATION:
        raise ValueError(f"clip_benchmark dataset {name!r} is not a zero-shot classification set; "
                         f"of clip_benchmark's other sets the retrieval sets {RETRIEVAL_NAMES} are supported")
    try:
        dataset = build_dataset(name, root=str(root), transform=None, split=split, download=True, language=language)
    except ImportError as err:  # clip_benchmark imports some dependencies (requests, ...) only here
        raise MissingDependencyError(f"clip_benchmark dataset {name!r} needs the {err.name or err} package: "
                                     f"{CLIP_BENCHMARK_HINT}") from err
    except OSError as err:  # offline: the first use downloads into root
        raise FileNotFoundError(f"clip_benchmark dataset {name!r} is not in {str(root)!r} and could not be "
                                f"downloaded ({type(err).__name__}: {err}); it needs the internet once") from err
    labels = [int(dataset[i][1]) for i in range(len(dataset))] if not hasattr(dataset, "targets") \
        else [int(t) for t in dataset.targets]
    templates = [t.replace("{c}", "{}") for t in dataset.templates] if isinstance(dataset.templates, list) else \
        clip_benchmark_prompts(name, language)[1]
    return EvalDataset(name, split, _LabelledPairs(dataset, range(len(dataset))), labels,
                       list(dataset.classes), templates)


def load_dataset(name: str, split: str | None = None, n: int | None = None, seed: int = 0,
                 root: str | os.PathLike | None = None, default_split: str = "test") -> EvalDataset:
    """`shapes`, a folder (ImageFolder layout), a .csv file, `wds:` shards, or a clip_benchmark dataset name
    (classification, or the retrieval sets flickr30k, flickr8k, mscoco_captions, read from `root`); n evenly
    spaced items.

    `split` None: `default_split` where the dataset has it, else the whole set ("all"). A named split a
    folder or CSV does not have is an error (never silently the whole set)."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise TypeError(f"dataset must be 'shapes', a folder, a .csv file, wds:SHARDS or a clip_benchmark name, "
                        f"got {name!r}")
    strict, split = split is not None, default_split if split is None else split
    if str(name) == "shapes":
        return shapes_dataset(split, n=n, seed=seed)
    if str(name).startswith(WDS_PREFIX):
        dataset = webdataset_dataset(str(name), split)
        if strict and dataset.split != split and split != "all":
            raise ValueError(f"dataset {str(name)!r} is one split, 'all' (a shard pattern), not {split!r}: leave "
                             "split out, or use clip_benchmark's export folder (wds:DIR with DIR/<split>/)")
        return evenly_spaced(dataset, n)
    if str(name) in RETRIEVAL_NAMES:
        return evenly_spaced(retrieval_dataset(str(name), split, root or "clip_benchmark_data"), n)
    path = Path(name)
    if path.is_dir():
        return evenly_spaced(image_folder_dataset(path, split, strict_split=strict), n)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise FileNotFoundError(f"dataset CSV {str(path)!r} does not exist")
        return evenly_spaced(csv_dataset(path, split=split, strict_split=strict), n)
    try:
        _clip_benchmark_module()
    except MissingDependencyError:
        raise MissingDependencyError(f"dataset {str(name)!r} is not 'shapes', an existing folder or a .csv file; "
                                     f"for clip_benchmark dataset names {CLIP_BENCHMARK_HINT}") from None
    return evenly_spaced(clip_benchmark_dataset(str(name), split, root or "clip_benchmark_data"), n)
