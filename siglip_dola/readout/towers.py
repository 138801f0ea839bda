"""What an adapter tells the readout about a vision tower: hook targets, the model's own embedding and head."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from siglip_dola.readout.map_head import MapHeadParts


@dataclass(frozen=True)
class Tower:
    """A supported vision tower, bound to the model's own modules (nothing here is ever written)."""

    backend: str                                           # "timm" | "hf" | "open_clip"
    blocks: Sequence[nn.Module]                            # transformer blocks 1..N, in order
    embed: Callable[[torch.Tensor], torch.Tensor]          # images (B,3,H,W) -> z_final (B,D): the model's own forward
    final_norm: nn.Module                                  # norm applied to block N's output before the head
    own_head: Callable[[torch.Tensor], torch.Tensor]       # normed tokens (B,T,D) -> (B,D) via the model's own head
    map_parts: Callable[[], MapHeadParts | None]           # the head taken apart, or None when it is not a plain MAP head
    head_modules: tuple[nn.Module, ...]                    # modules whose weights the folded head derives from
    token_dim: int                                         # D of the block outputs
    image_size: tuple[int, int]
    in_chans: int
    dynamic_size: bool = False                             # the model accepts other image sizes
    # towers whose head is not a MAP head (class token, average, masked MAP) say how to pool each layer:
    # layer_head(folded) -> a token_head.LayerHead; None: the folded MAP head (map_parts) or the model's own
    layer_head: Callable[[bool], object] | None = None
    extra_inputs: tuple[str, ...] = ()                     # keyword inputs of embed besides the images
    # (images, **extra) -> (images, extra) checked and completed (ValueError); None: [B, C, H, W] images only
    prepare_inputs: Callable[..., tuple] | None = None


def two_tuple(size) -> tuple[int, int]:
    """An int or (H, W) pair as a (H, W) tuple of ints."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


@dataclass(frozen=True)
class Trunk:
    """A vision tower's blocks and final norm without its head: read through another model's head (borrowed_head.py)."""

    backend: str                                           # "timm" | "hf"
    blocks: Sequence[nn.Module]                            # transformer blocks 1..N, in order
    final_norm: nn.Module                                  # the trunk's own norm after block N
    tokens: Callable[[torch.Tensor], torch.Tensor]         # images (B,3,H,W) -> final_norm(h_N) (B,T,D): the model's own forward
    token_dim: int
    image_size: tuple[int, int]
    in_chans: int
    dynamic_size: bool = False
