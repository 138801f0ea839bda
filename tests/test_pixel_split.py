"""data/pixel_split.py: uint8 pixels from the decode workers, the float conversion where the pixels are; equal to
the model's own whole preprocess (open_clip's and timm's transforms), bit for bit, and refused where it would not be."""
import types

import numpy as np
import open_clip
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data import create_transform, resolve_data_config

from siglip_dola.data import pixel_split
from siglip_dola.data.pixel_split import split_preprocess
from siglip_dola.embedding.pixel_batches import iter_pixel_batches


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(375, 500), (500, 375), (7, 3), (384, 384)]   # (H, W): landscape, portrait, tiny, already the size
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


TRANSFORMS = {
    "open_clip squash 384, mean 0.5": lambda: open_clip.image_transform(384, is_train=False, mean=(0.5,) * 3,
                                                                       std=(0.5,) * 3, resize_mode="squash"),
    "open_clip ViT-B-32 (OpenAI mean/std)": lambda: open_clip.create_model_and_transforms("ViT-B-32",
                                                                                          pretrained=None)[2],
    "timm vit_base_patch16_siglip_224": lambda: create_transform(**resolve_data_config(
        {}, model=timm.create_model("vit_base_patch16_siglip_224", pretrained=False))),
    "one-value mean/std": lambda: T.Compose([T.Resize((16, 16)), T.ToTensor(), T.Normalize([0.3], [0.7])]),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_the_split_equals_the_whole_preprocess(name):
    preprocess = TRANSFORMS[name]()
    split = split_preprocess(preprocess)
    assert split is not None
    images = _images(8)
    host = torch.stack([split.on_host(image) for image in images])                      # (B, 3, H, W) uint8
    assert host.dtype == torch.uint8
    expected = torch.stack([preprocess(image) for image in images])                       # (B, 3, H, W) fp32
    assert torch.equal(split.finish(host), expected)
    assert torch.equal(split.finish(host), expected)   # again, with the cached device constants


@pytest.mark.parametrize("preprocess", [
    T.Compose([T.Resize((8, 8)), T.ToTensor()]),                                  # no Normalize
    T.Compose([T.Resize((8, 8)), T.Normalize([0.5] * 3, [0.5] * 3)]),            # no ToTensor
    T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3), T.ConvertImageDtype(torch.half)]),
    T.Compose([T.Grayscale(1), T.ToTensor(), T.Normalize([0.5], [0.5])]),          # not RGB before ToTensor
    T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]),
    lambda image: torch.zeros(3, 8, 8),                                            # not a Compose
])
def test_other_preprocesses_are_not_split(preprocess):
    assert split_preprocess(preprocess) is None


def test_device_constants_are_made_once_per_device():
    # a host->device copy per batch would synchronise the stream on CUDA: the constants are cached
    first = pixel_split.device_constant((0.5, 0.25, 1.0), torch.device("cpu"))
    assert pixel_split.device_constant((0.5, 0.25, 1.0), torch.device("cpu")) is first
    assert first.shape == (3, 1, 1) and first.dtype == torch.float32 and not first.is_inference()


@pytest.mark.parametrize("workers", [0, 2])
def test_pixel_batches_from_files_equal_the_whole_preprocess(tmp_path, workers):
    preprocess = TRANSFORMS["open_clip squash 384, mean 0.5"]()
    paths = []
    for i, image in enumerate(_images(6, seed=1)):
        paths.append(str(tmp_path / f"{i}.jpg"))
        image.save(paths[-1], quality=90)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    model = types.SimpleNamespace(preprocess=preprocess, device="cpu")
    batches = list(iter_pixel_batches(model, paths, batch_size=4, workers=workers))
    pixels = torch.cat([b.pixels for b in batches if b.pixels is not None])
    assert pixels.dtype == torch.float32
    assert [s[0] for b in batches for s in b.skipped] == [paths[2]]
    with Image.open(paths[0]) as first:
        assert torch.equal(pixels[0], preprocess(first.convert("RGB")))
    expected = []
    for path in paths[:2] + paths[3:]:
        with Image.open(path) as image:
            expected.append(preprocess(image.convert("RGB")))
    assert torch.equal(pixels, torch.stack(expected))
