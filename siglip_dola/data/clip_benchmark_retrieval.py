"""clip_benchmark's image-caption retrieval sets (flickr30k, flickr8k, mscoco_captions) through its own builder.

clip_benchmark's `build_dataset` ignores `download=False` for these sets: when a file is missing it shells out
to kaggle / wget (which, offline, fails late or hangs). So the files it would read are checked here first,
and a missing one is a FileNotFoundError naming every path looked for; the builder only ever sees complete
data. Layout under `root` (as clip_benchmark's downloads leave it, Karpathy splits):
  flickr30k / flickr8k: <root>/<image>.jpg and <root>/<name>_<split>_karpathy.txt ("image,caption" lines
                        after a header; one line per caption, 5 per image)
  mscoco_captions:      <root>/val2014/ (val, test) or <root>/train2014/ (train) and <root>/coco_<split>_karpathy.json
                        (COCO captions format: "images" [{id, file_name}], "annotations" [{image_id, caption}])
Every caption of an image is kept, as clip_benchmark's zeroshot_retrieval scores them.
"""
from __future__ import annotations

import os
from pathlib import Path

from siglip_dola.data.eval_dataset import EvalDataset, MissingDependencyError, clip_benchmark_builder
from siglip_dola.tasks import RETRIEVAL

RETRIEVAL_NAMES = ("flickr30k", "flickr8k", "mscoco_captions")
SPLITS = ("train", "val", "test")
ANNOTATIONS_URL = "https://github.com/mehdidc/retrieval_annotations/releases/tag/1.0.0"
IMAGES_FROM = {"flickr30k": "https://www.kaggle.com/datasets/hsankesara/flickr-image-dataset",
               "flickr8k": "https://www.kaggle.com/datasets/adityajn105/flickr8k",
               "mscoco_captions": "http://images.cocodataset.org/zips/{folder}.zip"}


def expected_files(name: str, split: str, root: str | os.PathLike) -> tuple[Path, Path]:
    """(image folder, annotation file) clip_benchmark's builder reads for `name` / `split` under `root`."""
    root = Path(root)
    if name == "mscoco_captions":
        return root / ("train2014" if split == "train" else "val2014"), root / f"coco_{split}_karpathy.json"
    return root, root / f"{name}_{split}_karpathy.txt"


def _check_files(name: str, split: str, root) -> tuple[Path, Path]:
    images, annotations = expected_files(name, split, root)
    missing = [p for p in (images, annotations) if not p.exists()]
    if missing:
        where = IMAGES_FROM[name].format(folder=images.name)
        raise FileNotFoundError(
            f"clip_benchmark dataset {name!r} split {split!r} is not on disk under dataset root {str(root)!r}: "
            f"looked for {', '.join(repr(str(p)) for p in missing)} (not found). siglip-dola does not download: "
            f"put the images in {str(images)!r} (from {where}) and the Karpathy split file "
            f"{annotations.name!r} (from {ANNOTATIONS_URL}) in {str(annotations.parent)!r}")
    return images, annotations


def _image_captions(dataset) -> list[tuple[Path, list[str]]]:
    """[(image path, its captions)] in the builder's order, read from the dataset object it returned."""
    if hasattr(dataset, "coco"):  # torchvision CocoCaptions
        coco = dataset.coco
        return [(Path(dataset.root) / coco.loadImgs(image_id)[0]["file_name"],
                 [a["caption"] for a in coco.loadAnns(coco.getAnnIds(image_id))]) for image_id in dataset.ids]
    return [(Path(dataset.root) / image, list(captions)) for image, captions in dataset.data]  # clip_benchmark Flickr


def retrieval_dataset(name: str, split: str = "test", root: str | os.PathLike = "clip_benchmark_data") -> EvalDataset:
    """An image-caption EvalDataset of clip_benchmark retrieval set `name` from `root`; never downloads.

    Items are image paths (decoded by the embedding workers; an unreadable image is reported and skipped),
    captions [n][k] every caption of each image, no class labels.
    """
    if name not in RETRIEVAL_NAMES:
        raise ValueError(f"name must be one of {RETRIEVAL_NAMES}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} for clip_benchmark dataset {name!r}, got {split!r}")
    _, annotations = _check_files(name, split, root)
    build_dataset = clip_benchmark_builder(name)
    try:  # every file it reads exists, so none of its download branches runs
        dataset = build_dataset(name, root=str(root), transform=None, split=split, download=False,
                                annotation_file=str(annotations), task=RETRIEVAL)
    except ImportError as err:  # mscoco_captions: torchvision's CocoCaptions needs pycocotools
        raise MissingDependencyError(f"clip_benchmark dataset {name!r} needs the {err.name or err} package: "
                                     f"pip install {err.name or 'pycocotools'}") from err
    except (ValueError, KeyError) as err:
        raise ValueError(f"clip_benchmark dataset {name!r}: annotation file {str(annotations)!r} could not be "
                         f"read ({type(err).__name__}: {err})") from None
    pairs = [(image, captions) for image, captions in _image_captions(dataset) if captions]
    if not pairs:
        raise ValueError(f"clip_benchmark dataset {name!r}: annotation file {str(annotations)!r} lists no captions")
    return EvalDataset(name, split, [image for image, _ in pairs], [-1] * len(pairs), [], [],
                       [captions for _, captions in pairs], tasks=(RETRIEVAL,))
