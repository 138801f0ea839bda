"""Image inputs: expand files/folders/globs into paths, decode + preprocess in batches, skip and report bad files."""
from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

# Folders are searched for these extensions only (so a README or a .DS_Store next to the images is not
# reported as a broken image); files named explicitly or matched by a glob are always tried.
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_GLOB_CHARS = frozenset("*?[")


@dataclass
class ImageBatch:
    """One batch of decoded images: `pixels` [B, 3, H, W] for `paths` (B of them); `skipped` [(path, error)].

    `pixels` is None when every file of the batch failed to decode (then `paths` is empty).
    """
    paths: list[Path]
    pixels: torch.Tensor | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _folder_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, by extension."""
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _expand_one(item: str | os.PathLike) -> list[Path]:
    """Paths named by one input: a file, a folder (recursive) or a glob pattern."""
    path = Path(item)
    if path.is_dir():
        return _folder_images(path)
    if path.is_file():
        return [path]
    if _GLOB_CHARS & set(str(item)):
        matches = [Path(m) for m in glob.glob(str(item), recursive=True)]
        files = [m for m in matches if m.is_file()]
        for folder in (m for m in matches if m.is_dir()):
            files.extend(_folder_images(folder))
        if files:
            return files
        raise FileNotFoundError(f"images: the pattern {str(item)!r} matches no files")
    raise FileNotFoundError(f"images: {str(item)!r} is not an existing file, folder or glob pattern")


def expand_image_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders (recursive, image extensions only) and globs -> sorted, de-duplicated list of paths.

    A missing file or folder, or a glob matching nothing, raises FileNotFoundError naming it.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    unique: dict[Path, Path] = {}  # resolved path -> path as the user wrote it (first seen wins)
    for item in inputs:
        for path in _expand_one(item):
            unique.setdefault(path.resolve(), path)
    if not unique:
        raise ValueError(f"images: no image files found in {list(map(str, inputs))}")
    return sorted(unique.values(), key=str)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB view of any PIL image, as a viewer would show it.

    EXIF orientation applied (phone photos are stored sideways); 16/32-bit and float greys scaled to
    8 bits (PIL's convert clips them: a 16-bit scan turns white); transparency composited on white, as
    transformers' `convert_to_rgb` does (dropping alpha exposes whatever colour transparent pixels hold).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64)  # (H, W)
        finite = array[np.isfinite(array)]
        top = finite.max() if finite.size else 1.0
        scale = 65535.0 if image.mode.startswith("I;16") or (image.mode == "I" and 255 < top <= 65535) else \
            (1.0 if image.mode == "F" and top <= 1.0 else max(top, 1.0))
        array = np.nan_to_num(array / scale, nan=0.0, posinf=1.0, neginf=0.0)
        image = Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: str | os.PathLike, preprocess: Callable) -> torch.Tensor:
    """Open one file with PIL, convert to RGB (see `to_rgb`) and apply `preprocess` -> [3, H, W].

    ValueError naming the file when it is not a readable image (a folder, not an image, truncated,
    a decompression bomb past PIL's pixel limit).
    """
    if Path(path).is_dir():
        raise ImageReadError(path, "IsADirectoryError: a folder, not an image file")
    try:
        with Image.open(path) as image:
            image = to_rgb(image)  # forces a full decode: truncated files fail here, not later
    except (OSError, SyntaxError, Image.DecompressionBombError, ValueError) as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from None
    return preprocess(image)


class ImageReadError(ValueError):
    """A file that is not a readable image; `reason` is the cause ("UnidentifiedImageError: ...")."""

    def __init__(self, path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"image {str(path)!r} cannot be read ({reason})")


def _try_decode(path: Path, preprocess: Callable) -> torch.Tensor | str:
    """The decoded tensor, or the error as text (anything PIL or the transform raises)."""
    try:
        return decode_image(path, preprocess)
    except ImageReadError as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - a bad file must never end the batch
        return f"{type(err).__name__}: {err}"


def _collate(paths: list[Path], decoded: list[torch.Tensor | str]) -> ImageBatch:
    """Stack the good images of one batch and list the bad ones."""
    good = [(p, d) for p, d in zip(paths, decoded) if isinstance(d, torch.Tensor)]
    skipped = [(p, d) for p, d in zip(paths, decoded) if isinstance(d, str)]
    pixels = torch.stack([d for _, d in good]) if good else None  # (B, 3, H, W)
    return ImageBatch(paths=[p for p, _ in good], pixels=pixels, skipped=skipped)


def iter_image_batches(paths: list[Path], preprocess: Callable, batch_size: int = 32,
                       num_workers: int | None = None) -> Iterator[ImageBatch]:
    """Yield ImageBatch(paths, pixels [B, 3, H, W], skipped) in input order; bad files are skipped, never raised.

    Decoding runs in a small thread pool (PIL releases the GIL); the next batch is decoded while the
    caller works on the current one.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    paths = [Path(p) for p in paths]
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    workers = num_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(chunk):
            return [pool.submit(_try_decode, p, preprocess) for p in chunk]
        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            current = pending
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            yield _collate(chunk, [f.result() for f in current])
