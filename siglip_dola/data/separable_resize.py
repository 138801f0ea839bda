"""Resize uint8 images on any device the way the CPU path's resizer does: two separable passes, each rounded back to
uint8, in the resizer's order.

Pillow (open_clip's and timm's transforms on PIL images, transformers' PIL processors) and torch's native uint8
kernel (transformers' torchvision processors on CPU) filter one axis, store the result as uint8 (rounded and
clipped), then filter the other. A single float interpolation of both axes keeps the first pass's overshoot at hard
edges and lands up to ~20 levels away there; two passes with the rounding between them land within one level
(fixed- vs floating-point weights) on a few pixels in 10,000 (tests/test_gpu_decode.py). Pillow runs the vertical
pass first when the height shrinks by more than twice what the width does (recent releases: found by a probe).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode

# which resizer the CPU path runs: Pillow; torch's native uint8 kernel (horizontal pass first); a float interpolation
RESIZERS = ("pillow", "torch_uint8", "torch_float")
_SEPARABLE = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


def _pass(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """float [n, 3, h, w] holding uint8 values -> float [n, 3, H, W] holding uint8 values (rounded, clipped)."""
    out = F.interpolate(images, size=list(size), mode=mode, align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_()


def _vertical_first(height: int, width: int, new_height: int, new_width: int, resizer: str) -> bool:
    shrink_h, shrink_w = height - new_height, width - new_width
    return resizer == "pillow" and pillow_shrinks_height_first() and shrink_h > 0 and shrink_h > 2 * shrink_w


def resize_uint8(images: torch.Tensor, size: tuple[int, int], interpolation: InterpolationMode,
                 resizer: str) -> torch.Tensor:
    """uint8 [n, 3, h, w] -> uint8 [n, 3, H, W] as `resizer` (one of RESIZERS) computes it, antialiased."""
    height, width = images.shape[-2:]
    new_height, new_width = size
    if interpolation not in _SEPARABLE or resizer == "torch_float":
        from torchvision.transforms import functional as TF
        return TF.resize(images, [new_height, new_width], interpolation=interpolation, antialias=True)
    mode, out = interpolation.value, images.to(torch.float32)
    if _vertical_first(height, width, new_height, new_width, resizer):
        steps = [(new_height, width), (new_height, new_width)]
    else:
        steps = [(height, new_width), (new_height, new_width)]
    for step in steps:
        if tuple(out.shape[-2:]) != step:
            out = _pass(out, step, mode)
    return out.to(torch.uint8)


@functools.lru_cache(maxsize=1)
def pillow_shrinks_height_first() -> bool:
    """Whether the installed Pillow filters vertically first when the height shrinks by more than twice the width:
    a 40x12 black-and-white probe (hard edges: the two orders differ by many levels) resized to 9x11 by Pillow,
    compared with both orders."""
    from PIL import Image

    probe = (np.random.default_rng(0).integers(0, 2, (40, 12, 3)) * 255).astype(np.uint8)
    pillow = torch.from_numpy(np.array(Image.fromarray(probe).resize((11, 9), Image.BICUBIC))).permute(2, 0, 1)
    images = torch.from_numpy(probe).permute(2, 0, 1)[None].to(torch.float32)
    orders = {False: [(40, 11), (9, 11)], True: [(9, 12), (9, 11)]}
    distance = {}
    for vertical, steps in orders.items():
        out = images
        for step in steps:
            out = _pass(out, step, "bicubic")
        distance[vertical] = float((out[0] - pillow.float()).abs().sum())
    return distance[True] < distance[False]
