"""The generated shapes dataset: determinism, held-out combinations, pixels vs labels, export layout, CLI."""
import csv

import numpy as np
import pytest
from PIL import Image

from siglip_dola.data import shapes
from siglip_dola.cli import main as cli_main


def _png_bytes(split, n, seed):
    return [shapes.png_bytes(s.image) for s in shapes.make_split(split, n=n, seed=seed)]


def test_same_seed_gives_same_bytes_and_different_seed_differs():
    first = _png_bytes("test", 12, seed=3)
    assert first == _png_bytes("test", 12, seed=3)
    other = _png_bytes("test", 12, seed=4)
    assert sum(a != b for a, b in zip(first, other)) >= 10


def test_prefix_does_not_depend_on_n_and_splits_differ():
    short = shapes.make_split("val", n=5, seed=0)
    long = shapes.make_split("val", n=40, seed=0)
    assert [s.caption for s in short] == [s.caption for s in long[:5]]
    assert _png_bytes("val", 5, 0) == [shapes.png_bytes(s.image) for s in long[:5]]
    assert _png_bytes("val", 5, 0) != _png_bytes("test", 5, 0)


def test_held_out_combinations_never_in_train_but_in_val_and_test():
    train = shapes.make_split("train", n=900)
    for sample in train:
        words = sample.caption.split()
        assert f"{words[2]} {words[3]}" not in shapes.HELD_OUT
        assert shapes.CLASSNAMES[sample.label] == f"{words[2]} {words[3]}"
    for split in ("val", "test"):
        names = {shapes.CLASSNAMES[s.label] for s in shapes.make_split(split, n=len(shapes.CLASSNAMES))}
        assert names == set(shapes.CLASSNAMES)
    # zero-shot, not zero-vocabulary: each held-out word occurs in train captions
    train_words = {w for s in train for w in s.caption.split()}
    assert {w for name in shapes.HELD_OUT for w in name.split()} <= train_words
    assert len(shapes.HELD_OUT) == 6 and shapes.HELD_OUT < set(shapes.CLASSNAMES)


def test_pixels_show_the_labelled_colour_on_the_captioned_background():
    for sample in shapes.make_split("test", n=36, seed=1):
        pixels = np.asarray(sample.image)
        assert pixels.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and pixels.dtype == np.uint8
        words = sample.caption.split()
        colour, background = shapes.COLOURS[words[2]], shapes.BACKGROUNDS[words[6]]
        shape_pixels = np.all(pixels == colour, axis=-1).sum()
        assert shape_pixels >= 20, sample.caption                     # the small diamond is the smallest shape
        assert np.all(pixels[0, 0] == background) or np.all(pixels[-1, -1] == background)


def test_shapes_differ_in_area_as_geometry_says():
    # same colour, size, centre: a square covers more pixels than the triangle with the same circumradius
    kwargs = dict(colour=(255, 0, 0), background=(0, 0, 0), centre=(32, 32), radius=20, angle=0.0)
    area = {s: np.all(np.asarray(shapes.draw_shape(s, **kwargs)) == (255, 0, 0), axis=-1).sum() for s in shapes.SHAPES}
    assert area["circle"] > area["square"] > area["triangle"]
    assert abs(area["circle"] - np.pi * 400) < 0.05 * np.pi * 400
    assert abs(area["square"] - 2 * 400) < 0.05 * 800                  # side sqrt(2) * r


def test_export_layout(tmp_path):
    out = shapes.export(tmp_path / "out", split="test", n=7, seed=2)
    with open(out / "labels.csv", newline="") as f:
        labels = list(csv.reader(f))
    with open(out / "captions.csv", newline="") as f:
        captions = list(csv.reader(f))
    assert labels[0] == ["path", "label"] and captions[0] == ["path", "caption"]
    assert len(labels) == len(captions) == 8
    assert (out / "classnames.txt").read_text().splitlines() == shapes.CLASSNAMES
    samples = shapes.make_split("test", n=7, seed=2)
    for sample, (path, label), (cpath, caption) in zip(samples, labels[1:], captions[1:]):
        assert path == cpath and label == shapes.CLASSNAMES[sample.label] and caption == sample.caption
        assert np.array_equal(np.asarray(Image.open(out / path).convert("RGB")), np.asarray(sample.image))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [row[0] for row in labels[1:]] + ["labels.csv", "captions.csv", "classnames.txt"])   # no temp files left


def test_cli_shapes_export(tmp_path, capsys):
    assert cli_main(["shapes", "export", str(tmp_path), "--split", "val", "--n", "3", "--seed", "1"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 3
    assert "3 val images" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, word", [(dict(split="dev"), "split"), (dict(split="test", n=-1), "n"),
                                          (dict(split="test", n=2.5), "n")])
def test_bad_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        shapes.make_split(**kwargs)
