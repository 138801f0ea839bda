"""DoLa's log-space core: the ONE eager reference of each formula (logits, JSD, layer choice, contrast, mask).

Tensors in, tensors out, no checks and no host reads: the public functions of steps.py and pipeline.py
validate their inputs, call these, and read the device-side checks once at the end. scoring/kernel.py
computes :func:`dola_log` (``compat=None``) in one Triton kernel; the tests compare the two.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from siglip_dola.layers import LayerSelection

LN2 = math.log(2.0)


@dataclass
class DoLaResult:
    """Output of :func:`~siglip_dola.scoring.dola`; arrays are of the input's kind (torch or numpy)."""

    probs: object            # [..., C] p_hat (q_N for mode "off"); masked classes exactly 0
    log_probs: object        # [..., C] log p_hat; masked classes -inf
    final_probs: object      # [..., C] q_N, the model's own distribution
    premature_layer: object  # [...] int64 layer number M per example (-1 for mode "off")
    jsd: object              # [J, ...] JSD(q_N, q_j) per candidate layer (compat: the official value)
    nonfinite: object = None  # [...] bool rows whose inputs held a NaN/inf; only from score(validate=False)


@functools.lru_cache(maxsize=64)
def layer_table(layers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[J] int64 layer numbers on device, built once: a host->device copy synchronises on CUDA."""
    with torch.inference_mode(False):
        return torch.tensor(layers, dtype=torch.int64, device=device)


def log_finite(probs: torch.Tensor) -> torch.Tensor:
    """log probs with log 0 = the most negative float: its exp is exactly 0, differences stay finite."""
    return torch.log(probs).clamp_min(torch.finfo(probs.dtype).min)


def rep_logits(reps: torch.Tensor, text_bank: torch.Tensor, tau: float) -> torch.Tensor:
    """s = <z/|z|, t/|t|> / tau: reps [..., D], text_bank [C, D] -> [..., C]; one matmul for all layers."""
    return F.normalize(reps, dim=-1) @ F.normalize(text_bank, dim=-1).T / tau  # (..., C)


def true_jsd(log_p, log_q, p, q) -> torch.Tensor:
    """True JSD (natural log) from FINITE log-probs and their probs (broadcast), clamped to [0, ln 2]."""
    log_m = torch.logaddexp(log_p, log_q) - LN2  # log((p + q) / 2), exact where p or q underflow
    terms = p * (log_p - log_m) + q * (log_q - log_m)  # 0 where p, q = 0
    return (0.5 * terms.sum(-1)).clamp(0.0, LN2)


def official_jsd(log_p, log_q, p, q) -> torch.Tensor:
    """The official DoLa code's value: F.kl_div(log P, M) = KL(M||P), mean over classes."""
    log_p, log_q = torch.broadcast_tensors(log_p, log_q)
    m = 0.5 * (p + q)
    return 0.5 * (F.kl_div(log_p, m, reduction="none").mean(-1) + F.kl_div(log_q, m, reduction="none").mean(-1))


def select_position(log_q_N, log_q_layers, q_N, q_layers, compat) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in layers [...] int64, jsd_table [J, ...]) from q_N [..., C], q_j [J, ..., C] and their logs.

    argmax returns the first maximal index, so exact ties go to the layer listed earliest.
    """
    if compat == "official-dola":
        table = official_jsd(log_q_N.unsqueeze(0), log_q_layers, q_N.unsqueeze(0), q_layers)  # (J, ...)
        batch_best = table.reshape(table.shape[0], -1).mean(-1).argmax()  # one layer for the whole batch
        return batch_best.expand(table.shape[1:]), table
    table = true_jsd(log_q_N.unsqueeze(0), log_q_layers, q_N.unsqueeze(0), q_layers)  # (J, ...)
    return table.argmax(dim=0), table


def contrast_log(log_q_N, log_q_M, alpha: float, q_M_may_be_zero: bool = False,
                 contrast_weight: float = 1.0) -> torch.Tensor:
    """log p_hat [..., C]: softmax over V_head of log q_N - lambda * log q_M, -inf outside V_head."""
    threshold = log_q_N.amax(dim=-1, keepdim=True) + math.log(alpha)  # log(alpha * max q_N)
    # lambda = 0 drops q_M entirely (0 * log 0 would be NaN); lambda = 1 keeps the exact design-note expression
    amateur = 0.0 if contrast_weight == 0 else log_q_M if contrast_weight == 1 else contrast_weight * log_q_M
    contrast = torch.where(log_q_N >= threshold, log_q_N - amateur, -math.inf)  # (..., C)
    if q_M_may_be_zero and contrast_weight != 0:  # probabilities given (from logits, log q_M is finite): F = +inf where q_M = 0
        infinite = torch.isposinf(contrast)
        limit = torch.where(infinite, 0.0, -math.inf).to(contrast.dtype)  # uniform over the F = +inf classes
        contrast = torch.where(infinite.any(dim=-1, keepdim=True), limit, contrast)
    return torch.log_softmax(contrast, dim=-1)


def dola_log(log_q_N, log_q_layers, layers, mode, alpha, static_layer, compat, contrast_weight=1.0) -> DoLaResult:
    """DoLa from finite log-probs: log_q_N [..., C], log_q_layers [J, ..., C] or None (then no contrast);
    mode: the modes.MODES entry, whose ``choose`` picks q_M's position (None: no contrast, p_hat = q_N)."""
    final_probs = torch.exp(log_q_N)
    if log_q_layers is None:
        premature = torch.full(log_q_N.shape[:-1], -1, dtype=torch.int64, device=log_q_N.device)
        return DoLaResult(final_probs, log_q_N, final_probs, premature, log_q_N.new_zeros((0, *log_q_N.shape[:-1])))
    assert isinstance(layers, LayerSelection) and len(layers) == log_q_layers.shape[0], layers   # checks.check_layers
    position, table = select_position(log_q_N, log_q_layers, final_probs, torch.exp(log_q_layers), compat)
    static_position = layers.index(int(static_layer)) if mode.fixed_layer else -1
    position = mode.choose(position, table, static_position)
    if position is None:
        return DoLaResult(final_probs, log_q_N, final_probs, torch.full_like(table[0], -1, dtype=torch.int64), table)
    gather = position[None, ..., None].expand(1, *log_q_N.shape)  # (1, ..., C)
    log_q_M = log_q_layers.gather(0, gather)[0]  # (..., C)
    log_p_hat = contrast_log(log_q_N, log_q_M, alpha, contrast_weight=contrast_weight)
    premature = layer_table(tuple(layers), position.device)[position]  # (...)
    return DoLaResult(torch.exp(log_p_hat), log_p_hat, final_probs, premature, table)
