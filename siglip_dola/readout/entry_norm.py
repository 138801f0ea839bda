"""Pooling layer j from block j+1's own first LayerNorm output, n = gamma * x_hat + beta (the fused path's EntryNorm).

The model computes n anyway, and n - beta = gamma * x_hat needs no statistics: the kernel's shifted mode reads n
with the probe p / gamma and scales the pooled vector by 1 / gamma. :func:`entry_norm` prepares it, or says why
pooling that output would not be exact (precision guards, other eps, unknown block types).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ENTRY_NORM_NAMES = ("norm1", "layer_norm1")   # a block's first LayerNorm: timm Block, HF SiglipEncoderLayer
ENTRY_BLOCK_TYPES = ("Block", "SiglipEncoderLayer")   # pre-norm blocks whose forward starts with norm(input)
_FP16_SAFE = 3.0e4                            # |gamma * x_hat| <= max|gamma| * sqrt(D) must stay below fp16's max


@dataclass(frozen=True)
class EntryNorm:
    """Block j+1's first LayerNorm, ready to pool layer j from its output n = gamma * x_hat + beta (derived)."""

    module: nn.Module
    probe: torch.Tensor   # (H, D) key_probe / gamma: (n - beta) . probe = x_hat . key_probe
    shift: torch.Tensor   # (D,) beta
    scale: torch.Tensor   # (D,) 1 / gamma: pooled (n - beta) * scale = pooled x_hat


def first_norm(block: nn.Module) -> nn.LayerNorm | None:
    """The LayerNorm a known pre-norm block applies first to its input (timm Block / HF SiglipEncoderLayer), or None."""
    if type(block).__name__ not in ENTRY_BLOCK_TYPES:
        return None
    return next((getattr(block, name) for name in ENTRY_NORM_NAMES
                 if isinstance(getattr(block, name, None), nn.LayerNorm)), None)


@torch.no_grad()
def entry_norm(block: nn.Module, folded) -> tuple[EntryNorm | None, str | None]:
    """(the EntryNorm of ``block`` for the folded head, None) or (None, why pooling its output would not be exact)."""
    norm = first_norm(block)
    dim = folded.key_probe.shape[-1]
    if norm is None:
        return None, f"block {type(block).__name__} has no known first LayerNorm"
    if folded.norm_eps is None or norm.weight is None or float(norm.eps) != folded.norm_eps:
        return None, "its first norm has no affine or another eps than the final norm"
    if tuple(norm.normalized_shape) != (dim,):
        return None, "its first norm normalises another shape"
    with torch.autocast(device_type=norm.weight.device.type, enabled=False):
        gamma = norm.weight.detach().to(folded.key_probe)
        beta = norm.bias.detach().to(gamma) if norm.bias is not None else torch.zeros_like(gamma)
        magnitude = gamma.abs()
        guards = torch.stack([magnitude.min(), magnitude.max() * dim ** 0.5, (beta.abs() / magnitude).max(),
                              magnitude.max() / magnitude.min(), (torch.isfinite(gamma).all() & torch.isfinite(beta).all()).to(gamma)])
        smallest, largest, shift_ratio, spread, finite = guards.tolist()   # one host read, once per weight version
    # precision guards: n - beta must stay fp16-safe and keep its bits (fp32 rounding of n is ~6e-8 |beta|)
    if not (finite and smallest > 0):
        return None, "its first norm's gamma has a zero or non-finite entry"
    if largest > _FP16_SAFE or shift_ratio > 1e3 or spread > 1e4:
        return None, (f"its first norm's affine fails the precision guards (max|gamma| sqrt(D) {largest:.3g}, "
                      f"max|beta/gamma| {shift_ratio:.3g}, max/min |gamma| {spread:.3g})")
    return EntryNorm(norm, (folded.key_probe / gamma).contiguous(), beta.contiguous(), (1.0 / gamma).contiguous()), None


def tensor_version(tokens: torch.Tensor) -> int | None:
    """The in-place version counter; None for inference-mode tensors, which have none (then only
    ENTRY_BLOCK_TYPES, whose forwards do not write their input, guard the held block output)."""
    return None if tokens.is_inference() else tokens._version
