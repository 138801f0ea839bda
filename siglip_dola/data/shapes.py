"""The generated ``shapes`` dataset: coloured shapes drawn with PIL, deterministic from a seed.

Each image shows one shape of one colour, at a size and position, on a plain background. The class
is the colour x shape combination ("red triangle"; 6 x 6 = 36 classes). The combinations in
``HELD_OUT`` never appear in the train split, so classifying them is genuinely zero-shot; their
words ("red", "triangle") still appear in train captions through the other combinations.
val and test contain all 36 classes. Every sample is drawn from its own RNG seeded by
(seed, split, index), so a split's first k samples do not depend on n.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from siglip_dola.io import atomic_path, write_text_atomic

IMAGE_SIZE = 64
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": (0.22, 0.32), "large": (0.38, 0.48)}     # shape radius as a fraction of the image side
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}

CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
# One held-out shape per colour and one colour per shape (a shifted diagonal), so every word is still seen in train.
HELD_OUT: frozenset[str] = frozenset(
    f"{colour} {SHAPES[(i + 2) % len(SHAPES)]}" for i, colour in enumerate(COLOURS))
TEMPLATES: list[str] = ["a {}.", "a photo of a {}.", "a {} on a background.", "an image of a {}."]
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 20000, "val": 720, "test": 1440}
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


@dataclass
class ShapeSample:
    """One generated image: ``label`` indexes ``CLASSNAMES``; ``name`` is a stable file stem."""
    image: Image.Image
    label: int
    caption: str
    name: str


def split_classes(split: str) -> list[int]:
    """Class indices that occur in ``split``: train lacks ``HELD_OUT``, val/test have all classes."""
    _check_split(split)
    if split == "train":
        return [i for i, name in enumerate(CLASSNAMES) if name not in HELD_OUT]
    return list(range(len(CLASSNAMES)))


def make_split(split: str, n: int | None = None, seed: int = 0) -> list[ShapeSample]:
    """The first ``n`` samples (default ``DEFAULT_SIZES[split]``) of ``split`` for ``seed``, labels balanced."""
    _check_split(split)
    n = DEFAULT_SIZES[split] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return [make_sample(split, index, seed) for index in range(n)]


class ShapeItems(Sequence):
    """(file stem, PIL image) pairs of samples ``indices`` of ``split``, drawn when read, so a split's images are
    never all held in memory (an evaluation streams them through the decode workers)."""

    def __init__(self, split: str, seed: int = 0, indices: range | None = None):
        _check_split(split)
        self.split, self.seed = split, seed
        self.indices = range(DEFAULT_SIZES[split]) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ShapeItems(self.split, self.seed, self.indices[index])
        sample = make_sample(self.split, self.indices[index], self.seed)
        return sample.name, sample.image

    def labels(self) -> list[int]:
        """Class index of each item (without drawing)."""
        classes = split_classes(self.split)
        return [classes[i % len(classes)] for i in self.indices]

    def captions(self) -> list[str]:
        """Caption of each item (without drawing)."""
        return [sample_caption(self.split, i, self.seed) for i in self.indices]


def make_sample(split: str, index: int, seed: int = 0) -> ShapeSample:
    """Sample ``index`` of ``split``: class ``index mod #classes`` (balanced), the rest drawn from its own RNG."""
    label, caption, name, drawing = _sample_spec(split, index, seed)
    return ShapeSample(image=draw_shape(*drawing), label=label, caption=caption, name=name)


def sample_caption(split: str, index: int, seed: int = 0) -> str:
    """The caption of sample ``index`` without drawing its image."""
    return _sample_spec(split, index, seed)[1]


def _sample_spec(split: str, index: int, seed: int) -> tuple[int, str, str, tuple]:
    """(label, caption, file stem, draw_shape arguments) of sample ``index``."""
    _check_split(split)
    classes = split_classes(split)
    label = classes[index % len(classes)]
    rng = random.Random(_sample_seed(seed, split, index))
    colour, shape = CLASSNAMES[label].split(" ")
    size = rng.choice(list(SIZES))
    background = rng.choice([b for b in BACKGROUNDS if not _too_close(colour, b)])
    radius = rng.uniform(*SIZES[size]) * IMAGE_SIZE
    margin = radius + 1
    centre = (rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin))
    angle = rng.uniform(-0.3, 0.3)
    caption = f"a {size} {colour} {shape} on a {background} background"
    drawing = (shape, COLOURS[colour], BACKGROUNDS[background], centre, radius, angle)
    return label, caption, f"{split}_{seed}_{index:05d}", drawing


def draw_shape(shape: str, colour, background, centre, radius: float, angle: float) -> Image.Image:
    """An ``IMAGE_SIZE`` RGB image with ``shape`` drawn at ``centre`` (pixels), anti-aliased by 4x supersampling."""
    scale = 4
    canvas = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), background)
    points = [(x * scale, y * scale) for x, y in _outline(shape, centre, radius, angle)]
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        cx, cy, r = centre[0] * scale, centre[1] * scale, radius * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(points, fill=colour)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _outline(shape: str, centre, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of ``shape`` with circumradius ``radius``, rotated by ``angle`` radians."""
    if shape == "circle":
        return []
    if shape == "square":
        polar = [(radius, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "diamond":
        polar = [(radius * (1.0 if k % 2 == 0 else 0.6), k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        polar = [(radius, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        polar = [(radius * (1.0 if k % 2 == 0 else 0.42), -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":
        arm = 0.36   # half-width of an arm relative to the radius
        corners = [(1, arm), (arm, arm), (arm, 1), (-arm, 1), (-arm, arm), (-1, arm),
                   (-1, -arm), (-arm, -arm), (-arm, -1), (arm, -1), (arm, -arm), (1, -arm)]
        polar = [(radius * math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    cx, cy = centre
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for r, a in polar]


DATASET_FILES = ("labels.csv", "captions.csv")
BYTES_PER_IMAGE = 2048  # a 64x64 PNG is 0.3-1.2 kB; with its two CSV rows this bounds what an image costs


def export(out_dir, split: str = "test", n: int = 50, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``n`` PNGs of ``split`` plus labels.csv, captions.csv, classnames.txt into ``out_dir``; return it.

    Images are drawn and written one at a time (the CSVs are streamed beside them), so memory does not grow
    with ``n``; ``n`` is checked against the free disk space first. A folder that already holds a dataset
    (labels.csv or captions.csv) is refused unless ``overwrite``: its older images would lose their labels.
    """
    out_dir = Path(out_dir)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_split(split)
    existing = [name for name in DATASET_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(17, f"the folder already holds a dataset ({', '.join(existing)}), whose images "
                              "would lose their labels; pass overwrite=True to replace its "
                              "label files, or choose an empty folder", str(out_dir))
    _check_disk_space(out_dir, n)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "labels.csv") as labels_tmp, atomic_path(out_dir / "captions.csv") as captions_tmp, \
            open(labels_tmp, "w", newline="", encoding="utf-8") as labels_file, \
            open(captions_tmp, "w", newline="", encoding="utf-8") as captions_file:
        labels, captions = csv.writer(labels_file, lineterminator="\n"), csv.writer(captions_file, lineterminator="\n")
        labels.writerow(("path", "label"))
        captions.writerow(("path", "caption"))
        for index in range(n):
            sample = make_sample(split, index, seed)
            with atomic_path(out_dir / f"{sample.name}.png") as tmp:
                tmp.write_bytes(png_bytes(sample.image))
            labels.writerow((f"{sample.name}.png", CLASSNAMES[sample.label]))
            captions.writerow((f"{sample.name}.png", sample.caption))
    write_text_atomic(out_dir / "classnames.txt", "".join(f"{name}\n" for name in CLASSNAMES))
    return out_dir


def _check_disk_space(out_dir: Path, n: int) -> None:
    """ValueError before anything is written when ``n`` images cannot fit on the folder's disk."""
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if n * BYTES_PER_IMAGE > free:
        raise ValueError(f"n={n} images need about {n * BYTES_PER_IMAGE / 1e9:.3g} GB, but {str(existing)!r} has "
                         f"{free / 1e9:.3g} GB free")


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG bytes (no metadata, so the bytes depend only on the pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _sample_seed(seed: int, split: str, index: int) -> int:
    # A hash, not seed + index, so that neighbouring seeds do not share samples.
    digest = hashlib.sha256(f"shapes/{seed}/{_SPLIT_SALT[split]}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _too_close(colour: str, background: str) -> bool:
    """Skip backgrounds the shape would nearly vanish on (yellow on white)."""
    distance = sum(abs(a - b) for a, b in zip(COLOURS[colour], BACKGROUNDS[background]))
    return distance < 120


def _check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
