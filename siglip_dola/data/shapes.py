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
from dataclasses import dataclass
from pathlib import Path

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


def make_sample(split: str, index: int, seed: int = 0) -> ShapeSample:
    """Sample ``index`` of ``split``: class ``index mod #classes`` (balanced), the rest drawn from its own RNG."""
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
    image = draw_shape(shape, COLOURS[colour], BACKGROUNDS[background], centre, radius, angle)
    caption = f"a {size} {colour} {shape} on a {background} background"
    return ShapeSample(image=image, label=label, caption=caption, name=f"{split}_{seed}_{index:05d}")


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


def export(out_dir, split: str = "test", n: int = 50, seed: int = 0) -> Path:
    """Write ``n`` PNGs of ``split`` plus labels.csv, captions.csv, classnames.txt into ``out_dir``; return it."""
    out_dir = Path(out_dir)
    samples = make_split(split, n=n, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sample in samples:
        with atomic_path(out_dir / f"{sample.name}.png") as tmp:
            tmp.write_bytes(png_bytes(sample.image))
    write_text_atomic(out_dir / "labels.csv", _csv([("path", "label")] + [
        (f"{s.name}.png", CLASSNAMES[s.label]) for s in samples]))
    write_text_atomic(out_dir / "captions.csv", _csv([("path", "caption")] + [
        (f"{s.name}.png", s.caption) for s in samples]))
    write_text_atomic(out_dir / "classnames.txt", "".join(f"{name}\n" for name in CLASSNAMES))
    return out_dir


def png_bytes(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG bytes (no metadata, so the bytes depend only on the pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
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
