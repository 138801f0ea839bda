"""images.py: path expansion (files, folders, globs) and batched decoding that skips bad files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dola.data.images import expand_image_paths, iter_image_batches


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A plain preprocess: RGB uint8 -> float [3, H, W] in [0, 1], resized to 8x8."""
    array = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def save_image(path: Path, value: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (10, 12), color=value if mode != "RGB" else (value, 0, 255 - value)).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path):
    save_image(tmp_path / "a.png", 10)
    save_image(tmp_path / "sub" / "b.jpg", 20)
    save_image(tmp_path / "sub" / "deep" / "c.png", 30, mode="L")  # grayscale -> converted to RGB
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_is_recursive_sorted_and_ignores_non_image_extensions(image_tree):
    paths = expand_image_paths([str(image_tree)])
    names = [p.relative_to(image_tree).as_posix() for p in paths]
    assert names == ["a.png", "sub/b.jpg", "sub/deep/c.png"]


def test_files_globs_and_folders_are_deduplicated(image_tree):
    inputs = [str(image_tree / "a.png"), str(image_tree / "*.png"), str(image_tree / "sub"),
              str(image_tree / "sub" / ".." / "a.png"), str(image_tree / "**" / "*.png")]
    paths = expand_image_paths(inputs)
    assert sorted(p.resolve() for p in paths) == sorted(
        (image_tree / n).resolve() for n in ["a.png", "sub/b.jpg", "sub/deep/c.png"])
    assert [str(p) for p in paths] == sorted(str(p) for p in paths)


def test_missing_inputs_raise_clear_errors(image_tree):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        expand_image_paths([str(image_tree / "nope.png")])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_image_paths([str(image_tree / "*.webp")])
    (image_tree / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        expand_image_paths([str(image_tree / "empty")])


def test_batches_decode_in_order_and_skip_bad_files(image_tree):
    corrupt = image_tree / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = image_tree / "truncated.png"
    truncated.write_bytes((image_tree / "a.png").read_bytes()[:40])
    text_file = image_tree / "sub" / "notes.txt"
    good = expand_image_paths([str(image_tree)])  # corrupt.jpg / truncated.png included by extension
    order = [image_tree / "a.png", corrupt, image_tree / "sub" / "b.jpg", truncated, text_file,
             image_tree / "sub" / "deep" / "c.png"]
    assert {p.resolve() for p in good} >= {corrupt.resolve(), truncated.resolve()}
    batches = list(iter_image_batches(order, to_tensor, batch_size=2, num_workers=2))
    assert [len(b.paths) + len(b.skipped) for b in batches] == [2, 2, 2]
    decoded = [p for b in batches for p in b.paths]
    skipped = [p for b in batches for p, _ in b.skipped]
    assert decoded == [order[0], order[2], order[5]]
    assert skipped == [corrupt, truncated, text_file]
    assert all(err for b in batches for _, err in b.skipped)
    for batch in batches:
        expected = [to_tensor(Image.open(p).convert("RGB")) for p in batch.paths]
        torch.testing.assert_close(batch.pixels, torch.stack(expected), rtol=0, atol=0)


def test_batch_of_only_bad_files_has_no_pixels(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    (batch,) = list(iter_image_batches([bad], to_tensor, batch_size=4))
    assert batch.pixels is None and batch.paths == [] and batch.skipped[0][0] == bad
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_image_batches([bad], to_tensor, batch_size=0))


# ---------------------------------------------------------------- unusual images
from PIL import ImageOps  # noqa: E402

from siglip_dola.data.images import ImageReadError, decode_image, to_rgb  # noqa: E402


def _rgb(image):
    return np.asarray(to_rgb(image), dtype=np.int64)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        got = _rgb(image)
    expected = np.round(ramp.astype(np.float64) / 65535 * 255)
    assert np.abs(got[..., 0] - expected).max() <= 1 and (got[..., 0] == got[..., 2]).all()


def test_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)  # palette index 0 (black) transparent
    with Image.open(tmp_path / "p.png") as image:
        got = _rgb(image)
    assert got[0, 0].tolist() == [255, 0, 0] and got[1, 1].tolist() == [255, 255, 255]
    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    assert _rgb(rgba)[0].tolist() == [[255, 255, 255], [127, 127, 255]]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (6, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "rot.jpg") as reopened:
        expected = np.asarray(ImageOps.exif_transpose(reopened))
        assert to_rgb(reopened).size == (2, 6)
    with Image.open(tmp_path / "rot.jpg") as reopened:
        np.testing.assert_array_equal(np.asarray(to_rgb(reopened)), expected)


def test_cmyk_and_one_pixel_decode(tmp_path):
    Image.new("CMYK", (5, 5), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    red = decode_image(tmp_path / "c.jpg", to_tensor)
    assert red.shape == (3, 8, 8) and red[0].mean() > 0.9 and red[1:].mean() < 0.1
    assert torch.allclose(decode_image(tmp_path / "one.png", to_tensor)[:, 0, 0], torch.tensor([10, 20, 30]) / 255)


def test_unreadable_inputs_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(ImageReadError, match="folder"):
        decode_image(tmp_path, to_tensor)
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: PIL refuses it as a bomb
    with pytest.raises(ImageReadError, match=r"bomb.png.*DecompressionBombError"):
        decode_image(tmp_path / "bomb.png", to_tensor)
    (batch,) = iter_image_batches([tmp_path / "bomb.png"], to_tensor)
    assert batch.pixels is None and "DecompressionBombError" in batch.skipped[0][1]


def test_symlink_loops_do_not_hang_the_folder_walk(tmp_path):
    save_image(tmp_path / "d" / "a.png", 10)
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "self.png").symlink_to(tmp_path / "d" / "self.png")  # a link to itself
    assert expand_image_paths([tmp_path / "d"]) == [tmp_path / "d" / "a.png"]
