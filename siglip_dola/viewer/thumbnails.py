"""Small JPEG thumbnails as data URIs, found by prediction id: an image file, else the dataset's own item.

A prediction's id is an image path or a dataset item id (see the Predictions JSONL contract). Paths that
exist are opened directly; the rest are looked up among `load_dataset(result["dataset"], split=...)`
items, which is loaded at most once and only when some id is not a readable file. An id found nowhere,
or an image that fails to decode, gets None (the report draws a placeholder) and is counted.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

MAX_THUMB_SIZE = 96


def jpeg_data_uri(image: Image.Image, size: int = 64, quality: int = 70) -> str:
    """`data:image/jpeg;base64,...` of `image` shrunk to fit size x size (aspect kept; never enlarged)."""
    if not 8 <= size <= MAX_THUMB_SIZE:
        raise ValueError(f"thumbnail size must be in [8, {MAX_THUMB_SIZE}] px, got {size}")
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _open_file(path: str) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _dataset_items(dataset: str | None, split: str | None) -> dict:
    """{item id: path or PIL image} of the dataset's split; {} when it cannot be loaded here."""
    if not dataset:
        return {}
    from siglip_dola.data.datasets import load_dataset

    try:
        items = load_dataset(dataset, split=split or "test").items
    except (ImportError, OSError, ValueError, RuntimeError, TypeError):
        return {}
    found = {}
    for item in items:
        if isinstance(item, tuple):
            found[str(item[0])] = item[1]
        else:
            found[str(item)] = str(item)
    return found


class ThumbnailSource:
    """id -> data URI or None, caching each id; the dataset is loaded lazily, once."""

    def __init__(self, dataset: str | None, split: str | None, size: int = 64, image_root: str | None = None):
        self.dataset, self.split, self.size = dataset, split, size
        self.image_root = None if image_root is None else Path(image_root)
        self._items: dict | None = None
        self._cache: dict[str, str | None] = {}
        self.missing: list[str] = []

    def _find(self, item_id: str) -> Image.Image | None:
        candidates = [item_id]
        if self.image_root is not None:
            candidates.append(str(self.image_root / Path(item_id).name))
        for candidate in candidates:
            if Path(candidate).is_file():
                return _open_file(candidate)
        if self._items is None:
            self._items = _dataset_items(self.dataset, self.split)
        item = self._items.get(item_id)
        if isinstance(item, str):
            return _open_file(item)
        return item

    def __call__(self, item_id: str) -> str | None:
        if item_id not in self._cache:
            image = self._find(str(item_id))
            self._cache[item_id] = None if image is None else jpeg_data_uri(image, self.size)
            if image is None:
                self.missing.append(str(item_id))
        return self._cache[item_id]
