"""A model's preprocess split where its float conversion starts: uint8 pixels on the host, floats on the device.

open_clip's and timm's transforms end in ``ToTensor()`` + ``Normalize(mean, std)``. Decode workers then run the
steps before them (decode, resize, crop) and hand over uint8 [3, H, W] (a quarter of the bytes through shared,
pinned and device memory, and no float work on the CPU); :meth:`PixelSplit.finish` does ToTensor's /255 and the
normalisation where the pixels are, with the same fp32 operations, element by element.

Chosen by a capability check (:func:`split_preprocess`): the transform's form, then a probe image run both ways
must give equal tensors; anything else keeps the whole preprocess on the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor
from torchvision.transforms.functional import pil_to_tensor

_PROBE_SIZE = (37, 29)   # (W, H) of the probe image: odd sizes, so resizes and crops do real work


@dataclass(frozen=True)
class PixelSplit:
    """``on_host``: PIL image -> uint8 [3, H, W]; ``finish``: uint8 [..., 3, H, W] -> preprocess's fp32 pixels."""

    head: Callable            # the preprocess steps before ToTensor (PIL -> PIL)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def on_host(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> uint8 [3, H, W] (the steps before ToTensor)."""
        image = self.head(image)
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise TypeError(f"the preprocess steps before ToTensor returned {type(image).__name__}, not an RGB image")
        return pil_to_tensor(image)

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> fp32 pixels, on their device: x / 255, then (x - mean) / std (as ToTensor, Normalize)."""
        scaled = pixels.to(torch.float32).div_(device_constant((255.0,), pixels.device))
        return scaled.sub_(device_constant(self.mean, pixels.device)).div_(device_constant(self.std, pixels.device))


@functools.lru_cache(maxsize=32)
def device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """fp32 [C, 1, 1] on `device`, made once: a device tensor, because a CPU scalar divisor is a reciprocal product
    on CUDA (not ToTensor's division), and cached, because a host->device copy per batch would synchronise."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def split_preprocess(preprocess) -> PixelSplit | None:
    """The PixelSplit of a ``Compose([..., ToTensor(), Normalize(mean, std)])`` whose probe image comes out equal
    both ways, else None (the preprocess then runs whole on the host)."""
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(preprocess, Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    if not isinstance(to_tensor, ToTensor) or not isinstance(normalize, Normalize):
        return None
    mean, std = torch.as_tensor(normalize.mean).flatten(), torch.as_tensor(normalize.std).flatten()
    if mean.numel() not in (1, 3) or std.numel() not in (1, 3):
        return None
    split = PixelSplit(Compose(list(steps[:-2])), tuple(mean.expand(3).tolist()), tuple(std.expand(3).tolist()))
    width, height = _PROBE_SIZE
    probe = Image.fromarray((np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3) * 37 % 256)
                            .astype(np.uint8), "RGB")
    try:
        same = torch.equal(split.finish(split.on_host(probe)), preprocess(probe))
    except Exception:  # noqa: BLE001 - any failure of the probe means: do not split
        return None
    return split if same else None
