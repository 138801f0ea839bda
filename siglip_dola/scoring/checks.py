"""Input plumbing and checks of the DoLa scoring: array kinds, dtypes, shapes, alpha, tau, modes, layers, values.

The eager checks read metadata only (shapes, dtypes, Python scalars), never tensor values, so they add no
host<->device sync. The value checks (NaN/inf, probabilities) are 0-d tensors on the input's device, queued
with the math and read ONCE per call, at its end, by :func:`raise_failed`.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from siglip_dola.layers import LayerSelection, checked_layers
from siglip_dola.modes import DEFAULT, Mode, mode_of

COMPAT_MODES = (None, "official-dola")


def to_tensor(x, name: str, device: torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """(tensor with x's dtype, on `device` if given, was_numpy) from a torch tensor or numpy array."""
    if isinstance(x, np.ndarray):
        tensor, was_numpy = torch.from_numpy(np.ascontiguousarray(x)), True
    elif isinstance(x, torch.Tensor):
        tensor, was_numpy = x, False
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    return (tensor if device is None else tensor.to(device)), was_numpy


def as_tensor(x, name: str, like: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """(float tensor, was_numpy); float64 is kept, every other dtype is computed in float32."""
    tensor, was_numpy = to_tensor(x, name)
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    device = like.device if like is not None else tensor.device
    return tensor.to(device=device, dtype=dtype), was_numpy


def promote(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return tuple(t.to(dtype) for t in tensors)


def to_output(x: torch.Tensor, to_numpy: bool):
    return x.detach().cpu().numpy() if to_numpy else x


def pair(a, b, a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(a, b as tensors of one float dtype on a's device, a was numpy); both need a class axis."""
    a_t, to_numpy = as_tensor(a, a_name)
    b_t, _ = as_tensor(b, b_name, like=a_t)
    check_classes(a_t, a_name)
    check_classes(b_t, b_name)
    return *promote(a_t, b_t), to_numpy


def check_classes(x: torch.Tensor, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be [..., C] with C >= 1 classes, got shape {list(x.shape)}")


def check_bank(text_bank: torch.Tensor, z: torch.Tensor, z_name: str) -> None:
    if text_bank.ndim != 2 or text_bank.shape[0] < 1:
        raise ValueError(f"text_bank must be [C, D] with C >= 1 candidates, got shape {list(text_bank.shape)}")
    if z.ndim < 1 or z.shape[-1] != text_bank.shape[-1]:
        raise ValueError(f"{z_name}'s last dim must equal text_bank's D={text_bank.shape[-1]}, "
                         f"got {z_name} shape {list(z.shape)}")


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in (0, 1], got {alpha!r}")
    if not 0.0 < float(alpha) <= 1.0:  # NaN fails this comparison too
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha)


def check_contrast_weight(contrast_weight) -> float:
    """lambda of F = log q_N - lambda * log q_M: a finite real >= 0 (1 = the design note, 0 = q_N on V_head)."""
    if isinstance(contrast_weight, bool) or not isinstance(contrast_weight, numbers.Real):
        raise TypeError(f"contrast_weight must be a finite real number >= 0, got {contrast_weight!r}")
    if not (math.isfinite(float(contrast_weight)) and float(contrast_weight) >= 0.0):
        raise ValueError(f"contrast_weight must be a finite real number >= 0, got {contrast_weight!r}")
    return float(contrast_weight)


def check_tau(tau) -> float:
    if isinstance(tau, torch.Tensor) and tau.numel() == 1:
        tau = tau.item()  # a host read: pass tau as a Python float on the hot path
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a positive finite real number, got {tau!r}")
    if not (math.isfinite(float(tau)) and float(tau) > 0):
        raise ValueError(f"tau must be > 0 and finite, got {tau!r}")
    return float(tau)


def check_compat(compat) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


@dataclass(frozen=True)
class Call:
    """What one score / dola call contrasts: the mode's table entry, the stacked layers' numbers, M, alpha, lambda."""
    mode: Mode
    layers: object
    static_layer: object
    alpha: float
    contrast_weight: float


def call_settings(settings, mode, alpha, static_layer, contrast_weight, compat) -> Call:
    """A :class:`Call` from a settings value (DoLaSettings: mode, layers, static_layer, alpha, contrast_weight) or,
    in the keyword form, from `settings` = the layer numbers and the keywords (defaults: dynamic, 0.1, None, 1)."""
    check_compat(compat)
    if hasattr(settings, "mode") and hasattr(settings, "alpha"):   # a DoLaSettings (duck-typed: it lives above)
        given = [name for name, value in (("mode", mode), ("alpha", alpha), ("static_layer", static_layer),
                                          ("contrast_weight", contrast_weight)) if value is not None]
        if given:
            raise TypeError(f"pass either settings or the keywords {given}, not both")
        mode, layers, static_layer = settings.mode, settings.layers, settings.static_layer
        alpha, contrast_weight = settings.alpha, settings.contrast_weight
        layers = layers or None   # a mode that reads no layer records []
    else:
        layers = settings
    return Call(mode_of(DEFAULT if mode is None else mode), layers, static_layer,
                check_alpha(0.1 if alpha is None else alpha),
                check_contrast_weight(1.0 if contrast_weight is None else contrast_weight))


def check_layers(layers, num_candidates: int) -> LayerSelection:
    """The layer numbers that label the J = ``num_candidates`` stacked distributions: raw numbers go through the one
    rule (layers.checked_layers), resolved settings' layers are taken as they are; only J is checked here."""
    if layers is None:
        raise TypeError(f"layers must be a non-empty sequence of layer numbers (ints >= 1), got {layers!r}")
    layers = checked_layers(layers)
    if len(layers) != num_candidates:
        raise ValueError(f"len(layers)={len(layers)} must equal the stacked layer axis (dim 0), "
                         f"of size {num_candidates}")
    return layers


def check_stacked(stacked: torch.Tensor, final: torch.Tensor, stacked_name: str, final_name: str) -> None:
    if stacked.ndim != final.ndim + 1 or stacked.shape[1:] != final.shape:
        expected = ", ".join(["J", *map(str, final.shape)])
        raise ValueError(f"{stacked_name} must have shape [J, *{final_name}.shape] = [{expected}], "
                         f"got {list(stacked.shape)}")


def resolve_stacked_layers(layers, stacked, final, names: tuple[str, str], mode: Mode, static_layer):
    """(layer numbers, stacked), or (None, None) when a mode that reads no layer by default ('off') has none; eager."""
    optional = not mode.reads_by_default
    if optional and stacked is not None and stacked.shape[0] == 0 and (layers is None or len(layers) == 0):
        stacked = None  # mode "off" with an empty stack of layers: nothing to compare
    if stacked is None:
        if not optional:
            raise ValueError(f"{names[0]} is required for mode={mode.name!r} (only mode='off' works without it)")
        return None, None
    check_stacked(stacked, final, *names)
    if not mode.fixed_layer:
        return check_layers(layers, stacked.shape[0]), stacked
    if static_layer is None or isinstance(static_layer, bool) or not isinstance(static_layer, numbers.Integral):
        raise ValueError(f"mode={mode.name!r} needs static_layer, an int layer number, got {static_layer!r}")
    layers = check_layers([int(static_layer)] if layers is None else layers, stacked.shape[0])  # J = 1 may omit layers
    if int(static_layer) not in layers:
        raise ValueError(f"static_layer={static_layer} must be one of layers={layers}")
    return layers, stacked


# ---------------------------------------------------------------- value checks on device, read once
def finite_check(x: torch.Tensor, name: str) -> tuple[torch.Tensor, str]:
    """(0-d tensor on x's device, 0 iff x has no NaN/inf: x - x is NaN there; the error); no host read."""
    return (x - x).sum(), f"{name} must be finite (no NaN or inf)"


def probability_check(x: torch.Tensor, name: str) -> tuple[torch.Tensor, str]:
    """0 iff x is finite and >= 0: |x| - x is > 0 for negatives, NaN for NaN/+inf, inf for -inf."""
    return (x.abs() - x).sum(), f"{name} must hold probabilities: finite, >= 0, no NaN"


def raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """The ONE host read of a call: raise the ValueError of the first failed device-side check."""
    passed = torch.stack([value for value, _ in checks]) == 0  # (K,) bool, on device
    index = torch.arange(len(checks), device=passed.device)
    first_failed = int(torch.where(passed, len(checks), index).min())  # the host sync
    if first_failed < len(checks):
        raise ValueError(checks[first_failed][1])
