"""Writers of small datasets in the real on-disk formats users bring (shapes images, so a model can score them):
clip_benchmark's flickr and mscoco retrieval layouts, webdataset tar shards, ImageFolder and CSV sets."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import webdataset as wds

from siglip_dola.data import shapes

SECOND_CAPTION = "a picture of the {} shape"


def captions_of(sample) -> list[str]:
    """Two captions per image (clip_benchmark's sets have 5): the shapes caption and a second wording."""
    return [sample.caption, SECOND_CAPTION.format(shapes.CLASSNAMES[sample.label])]


def write_flickr(root: Path, name: str = "flickr8k", split: str = "test", n: int = 12) -> list:
    """<root>/<image>.jpg and <root>/<name>_<split>_karpathy.txt ("image,caption" lines after a header)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = shapes.make_split(split, n=n)
    lines = ["image,caption"]
    for i, sample in enumerate(samples):
        sample.image.save(root / f"{1000 + i}_img.jpg", quality=95)
        lines += [f"{1000 + i}_img.jpg,{caption}" for caption in captions_of(sample)]
    (root / f"{name}_{split}_karpathy.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return samples


def write_mscoco(root: Path, split: str = "test", n: int = 12) -> list:
    """<root>/val2014/COCO_val2014_*.jpg and <root>/coco_<split>_karpathy.json (COCO captions format)."""
    folder = root / ("train2014" if split == "train" else "val2014")
    folder.mkdir(parents=True, exist_ok=True)
    samples = shapes.make_split(split, n=n)
    images, annotations = [], []
    for i, sample in enumerate(samples):
        image_id = 391895 + 7 * i  # COCO ids are not positions
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        sample.image.save(folder / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": 64, "width": 64})
        for caption in captions_of(sample):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    (root / f"coco_{split}_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return samples


def write_shards(folder: Path, split: str = "test", n: int = 30, n_shards: int = 3, image_format: str = "jpg",
                 name: str = "{:06d}.tar") -> list:
    """`n_shards` webdataset tars (TarWriter) of .jpg/.webp + .cls + .txt samples, with classnames.txt and
    zeroshot_classification_templates.txt ({c} marks the class, as clip_benchmark writes them) beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = shapes.make_split(split, n=n)
    per_shard = -(-n // n_shards)
    for shard in range(n_shards):
        with wds.TarWriter(str(folder / name.format(shard))) as writer:
            for i, sample in enumerate(samples[shard * per_shard:(shard + 1) * per_shard]):
                buffer = io.BytesIO()
                sample.image.save(buffer, format="JPEG" if image_format == "jpg" else image_format.upper(), quality=95)
                writer.write({"__key__": f"s{shard * per_shard + i:07d}", image_format: buffer.getvalue(),
                              "cls": str(sample.label), "txt": "\n".join(captions_of(sample))})
    (folder / "classnames.txt").write_text("\n".join(shapes.CLASSNAMES) + "\n", encoding="utf-8")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in shapes.TEMPLATES) + "\n", encoding="utf-8")
    return samples


def write_csv(folder: Path, split: str, n: int) -> Path:
    """<folder>/<split>.csv (path,label) with its images beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = shapes.make_split(split, n=n)
    with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for sample in samples:
            sample.image.save(folder / f"{split}_{sample.name}.png")
            writer.writerow([f"{split}_{sample.name}.png", shapes.CLASSNAMES[sample.label]])
    return folder / f"{split}.csv"


def write_image_folder(root: Path, splits: dict[str, int]) -> Path:
    """<root>/<split>/<class>/<image>.png for each split and its size."""
    for split, n in splits.items():
        for sample in shapes.make_split(split, n=n):
            folder = root / split / shapes.CLASSNAMES[sample.label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            sample.image.save(folder / f"{sample.name}.png")
    return root
