"""Pure DoLa math for SigLIP zero-shot scoring: tensors/arrays in and out, no I/O, no model classes.

The candidate classes/texts play the role of the vocabulary: q_j = softmax(cos(z_j, t_c) / tau).
Dynamic DoLa picks per example M = argmax_j JSD(q_N || q_j) over the candidate layers, keeps
V_head = {c : q_N(c) >= alpha * max q_N} and returns p_hat = softmax_{V_head}(log q_N - log q_M).

Conventions
- torch tensors (any device; fp16/bf16/fp32 computed in float32, float64 kept) and numpy arrays are
  accepted; results are of the input's kind (numpy in -> numpy out), float32 (float64 for float64
  input), on the input's device. Everything is batched over any leading dims ``...``.
- Work happens in log space, so nothing underflows to NaN for C up to 200,000 and logits up to +-1e4.
- Tie rule: when several layers reach exactly the same maximal JSD, the one listed EARLIEST in
  ``layers`` wins.
- q_M(c) = 0 on a kept class makes F(c) = +inf. Then p_hat puts all its mass, split equally, on the
  kept classes with F = +inf (the limit of the softmax when those classes' F grows without bound).
- ``compat="official-dola"`` reproduces the official DoLa code (voidism/DoLa, and HF transformers'
  ``_dola_select_contrast``) for people reproducing it: its "JSD" calls ``F.kl_div(log P, M)``,
  i.e. 0.5 * (KL(M||P) + KL(M||Q)), averaged (not summed) over the classes, and it averages that
  over the whole batch so ONE layer is chosen for all examples. The default (``compat=None``) is
  the true JSD with a per-example layer choice. Contrast and masking are the same in both.
"""
from __future__ import annotations

import math
import numbers
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("dynamic", "static", "off")
COMPAT_MODES = (None, "official-dola")
LN2 = math.log(2.0)


@dataclass
class DoLaResult:
    """Output of :func:`dola`; arrays are of the input's kind (torch or numpy)."""

    probs: object            # [..., C] p_hat (q_N for mode "off"); masked classes exactly 0
    log_probs: object        # [..., C] log p_hat; masked classes -inf
    final_probs: object      # [..., C] q_N, the model's own distribution
    premature_layer: object  # [...] int64 layer number M per example (-1 for mode "off")
    jsd: object              # [J, ...] JSD(q_N, q_j) per candidate layer (compat: the official value)


# ---------------------------------------------------------------- array plumbing and validation
def _as_tensor(x, name: str, like: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """(float tensor, was_numpy); float64 is kept, every other dtype is computed in float32."""
    if isinstance(x, np.ndarray):
        tensor, was_numpy = torch.from_numpy(np.ascontiguousarray(x)), True
    elif isinstance(x, torch.Tensor):
        tensor, was_numpy = x, False
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    device = like.device if like is not None else tensor.device
    return tensor.to(device=device, dtype=dtype), was_numpy


def _promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _out(x: torch.Tensor, to_numpy: bool):
    return x.detach().cpu().numpy() if to_numpy else x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _check_logits(x: torch.Tensor, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be [..., C] with C >= 1 classes, got shape {list(x.shape)}")
    _check_finite(x, name)


def _check_probs(x: torch.Tensor, name: str) -> None:
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty class axis (last dim C >= 1), got shape {tuple(x.shape)}")
    if not bool((torch.isfinite(x) & (x >= 0)).all()):
        raise ValueError(f"{name} must hold probabilities: finite, >= 0, no NaN")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number in (0, 1], got {alpha!r}")
    if not 0.0 < float(alpha) <= 1.0:  # NaN fails this comparison too
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha)


def _check_tau(tau) -> float:
    if isinstance(tau, torch.Tensor) and tau.numel() == 1:
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a positive finite real number, got {tau!r}")
    if not (math.isfinite(float(tau)) and float(tau) > 0):
        raise ValueError(f"tau must be > 0 and finite, got {tau!r}")
    return float(tau)


def _check_compat(compat) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


def _check_layers(layers, num_candidates: int) -> list[int]:
    """Layer numbers as a list of ints; matches the J = ``num_candidates`` stacked distributions."""
    if layers is None or isinstance(layers, (str, bytes)):
        raise TypeError(f"layers must be a non-empty sequence of layer numbers (ints >= 1), got {layers!r}")
    layers = layers.tolist() if hasattr(layers, "tolist") else list(layers)  # numpy / torch int arrays too
    if not layers:
        raise ValueError("layers must not be empty: give at least one candidate layer number")
    if any(isinstance(j, bool) or not isinstance(j, numbers.Integral) or j < 1 for j in layers):
        raise ValueError(f"layers must hold layer numbers (ints >= 1), got {layers}")
    layers = [int(j) for j in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not contain duplicates, got {layers}")
    if len(layers) != num_candidates:
        raise ValueError(f"len(layers)={len(layers)} must equal the stacked layer axis (dim 0), "
                         f"of size {num_candidates}")
    return layers


def _check_stacked(stacked: torch.Tensor, final: torch.Tensor, stacked_name: str, final_name: str) -> None:
    if stacked.ndim != final.ndim + 1 or stacked.shape[1:] != final.shape:
        expected = ", ".join(["J", *map(str, final.shape)])
        raise ValueError(f"{stacked_name} must have shape [J, *{final_name}.shape] = [{expected}], "
                         f"got {list(stacked.shape)}")


# ---------------------------------------------------------------- log-space core
def _rep_logits(z: torch.Tensor, text_bank: torch.Tensor, tau: float, z_name: str = "z") -> torch.Tensor:
    """s = <z/|z|, t/|t|> / tau: z [..., D], text_bank [C, D] -> [..., C]."""
    if text_bank.ndim != 2 or text_bank.shape[0] < 1:
        raise ValueError(f"text_bank must be [C, D] with C >= 1 candidates, got shape {list(text_bank.shape)}")
    if z.ndim < 1 or z.shape[-1] != text_bank.shape[-1]:
        raise ValueError(f"{z_name}'s last dim must equal text_bank's D={text_bank.shape[-1]}, "
                         f"got {z_name} shape {list(z.shape)}")
    _check_finite(z, z_name)
    _check_finite(text_bank, "text_bank")
    z, text_bank = _promote(z, text_bank)
    return F.normalize(z, dim=-1) @ F.normalize(text_bank, dim=-1).T / tau  # (..., C)


def _kl_log(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A||B) over the last axis from log-probs; 0 log 0 = 0."""
    terms = torch.exp(log_a) * (log_a - log_b)
    return torch.where(torch.isneginf(log_a), torch.zeros_like(terms), terms).sum(-1)


def _jsd_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """True JSD (natural log) from log-probs, clamped to [0, ln 2]."""
    log_m = torch.logaddexp(log_p, log_q) - LN2  # log((p + q) / 2), exact where p or q underflow
    return (0.5 * (_kl_log(log_p, log_m) + _kl_log(log_q, log_m))).clamp(0.0, LN2)


def _official_jsd_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """The official DoLa code's value: F.kl_div(log P, M) = KL(M||P), mean over classes."""
    log_p, log_q = torch.broadcast_tensors(log_p, log_q)
    m = 0.5 * (torch.exp(log_p) + torch.exp(log_q))
    kl1 = F.kl_div(log_p, m, reduction="none").mean(-1)
    kl2 = F.kl_div(log_q, m, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2)


def _first_argmax(table: torch.Tensor) -> torch.Tensor:
    """Index along dim 0 of the maximum; on exact ties the smallest index (earliest layer) wins."""
    best = table.max(dim=0, keepdim=True).values
    ids = torch.arange(table.shape[0], device=table.device).view(-1, *([1] * (table.ndim - 1)))
    return torch.where(table == best, ids, table.shape[0]).min(dim=0).values  # (...)


def _select_log(log_q_N, log_q_layers, compat) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in layers [...] int64, jsd_table [J, ...]) from log q_N [..., C] and log q_j [J, ..., C]."""
    if compat == "official-dola":
        table = _official_jsd_log(log_q_N.unsqueeze(0), log_q_layers)  # (J, ...)
        batch_mean = table.reshape(table.shape[0], -1).mean(-1)  # (J,) one layer for the whole batch
        return _first_argmax(batch_mean).expand(table.shape[1:]), table
    table = _jsd_log(log_q_N.unsqueeze(0), log_q_layers)  # (J, ...)
    return _first_argmax(table), table


def _layer_numbers(position: torch.Tensor, layers: list[int]) -> torch.Tensor:
    return torch.tensor(layers, dtype=torch.int64, device=position.device)[position]


def _contrast_log(log_q_N: torch.Tensor, log_q_M: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p_hat [..., C]: softmax over V_head of log q_N - log q_M, -inf outside V_head."""
    threshold = log_q_N.max(dim=-1, keepdim=True).values + math.log(alpha)  # log(alpha * max q_N)
    keep = log_q_N >= threshold
    contrast = torch.where(keep, log_q_N - log_q_M, torch.full_like(log_q_N, -math.inf))
    infinite = keep & torch.isposinf(contrast)  # kept classes with q_M = 0
    any_infinite = infinite.any(dim=-1, keepdim=True)
    # where some F = +inf, the softmax limit is uniform over exactly those classes
    limit = torch.where(infinite, torch.zeros_like(contrast), torch.full_like(contrast, -math.inf))
    return torch.log_softmax(torch.where(any_infinite, limit, contrast), dim=-1)


# ---------------------------------------------------------------- public API
def build_log_probs_from_rep(z, text_bank, tau):
    """log q [..., C] = log_softmax(cos(z, t_c) / tau) for z [..., D], text_bank [C, D]."""
    z_t, to_numpy = _as_tensor(z, "z")
    bank, _ = _as_tensor(text_bank, "text_bank", like=z_t)
    logits = _rep_logits(z_t, bank, _check_tau(tau))
    return _out(torch.log_softmax(logits, dim=-1), to_numpy)


def build_probs_from_rep(z, text_bank, tau):
    """q [..., C] = softmax(cos(z, t_c) / tau) for z [..., D], text_bank [C, D]."""
    log_q = build_log_probs_from_rep(z, text_bank, tau)
    return np.exp(log_q) if isinstance(log_q, np.ndarray) else torch.exp(log_q)


def jsd(p, q):
    """True Jensen-Shannon divergence (natural log) over the last axis: p, q [..., C] -> [...], in [0, ln 2]."""
    p_t, to_numpy = _as_tensor(p, "p")
    q_t, _ = _as_tensor(q, "q", like=p_t)
    _check_probs(p_t, "p")
    _check_probs(q_t, "q")
    if p_t.shape[-1] != q_t.shape[-1]:
        raise ValueError(f"p and q must have the same number of classes, got {p_t.shape[-1]} and {q_t.shape[-1]}")
    try:
        torch.broadcast_shapes(p_t.shape, q_t.shape)
    except RuntimeError:
        raise ValueError(f"p and q shapes must broadcast, got {list(p_t.shape)} and {list(q_t.shape)}") from None
    p_t, q_t = _promote(p_t, q_t)
    return _out(_jsd_log(torch.log(p_t), torch.log(q_t)), to_numpy)


def select_early_exit(q_N, q_layers, layers, compat=None):
    """(premature_layer [...] int64 layer numbers, jsd_table [J, ...]) for q_N [..., C], q_layers [J, ..., C].

    Per example M = argmax_j JSD(q_N, q_j); exact ties go to the layer listed earliest in ``layers``.
    """
    _check_compat(compat)
    q_final, to_numpy = _as_tensor(q_N, "q_N")
    q_stack, _ = _as_tensor(q_layers, "q_layers", like=q_final)
    _check_probs(q_final, "q_N")
    _check_probs(q_stack, "q_layers")
    layers = _check_layers(layers, q_stack.shape[0] if q_stack.ndim else 0)
    _check_stacked(q_stack, q_final, "q_layers", "q_N")
    q_final, q_stack = _promote(q_final, q_stack)
    position, table = _select_log(torch.log(q_final), torch.log(q_stack), compat)
    return _out(_layer_numbers(position, layers), to_numpy), _out(table, to_numpy)


def contrast_and_mask(q_N, q_M, alpha: float = 0.1):
    """(p_hat [..., C], log_p_hat [..., C]) = softmax over V_head of log q_N - log q_M; masked: 0 / -inf."""
    alpha = _check_alpha(alpha)
    q_final, to_numpy = _as_tensor(q_N, "q_N")
    q_early, _ = _as_tensor(q_M, "q_M", like=q_final)
    _check_probs(q_final, "q_N")
    _check_probs(q_early, "q_M")
    if q_final.shape != q_early.shape:
        raise ValueError(f"q_N and q_M must have the same shape, got {list(q_final.shape)} and {list(q_early.shape)}")
    if not bool((q_final.amax(dim=-1) > 0).all()):
        raise ValueError("q_N must have a positive entry in every row (it is a distribution)")
    q_final, q_early = _promote(q_final, q_early)
    log_p_hat = _contrast_log(torch.log(q_final), torch.log(q_early), alpha)
    return _out(torch.exp(log_p_hat), to_numpy), _out(log_p_hat, to_numpy)


def _resolve_static(layers, static_layer, num_candidates: int) -> tuple[list[int], int]:
    if static_layer is None or isinstance(static_layer, bool) or not isinstance(static_layer, numbers.Integral):
        raise ValueError(f"mode='static' needs static_layer, an int layer number, got {static_layer!r}")
    layers = [int(static_layer)] if layers is None else layers  # one stacked layer may stand alone
    layers = _check_layers(layers, num_candidates)
    if int(static_layer) not in layers:
        raise ValueError(f"static_layer={static_layer} must be one of layers={layers}")
    return layers, int(static_layer)


def _dola_tensors(final, stacked, layers, mode, alpha, static_layer, compat) -> DoLaResult:
    """DoLa on logits tensors: final [..., C], stacked [J, ..., C] or None."""
    log_q_N = torch.log_softmax(final, dim=-1)
    if mode == "off" and stacked is not None and stacked.shape[0] == 0 and (layers is None or len(layers) == 0):
        stacked = None  # mode "off" with an empty stack of layers: nothing to compare
    if stacked is None:
        if mode != "off":
            raise ValueError(f"scores_layers is required for mode={mode!r} (only mode='off' works without it)")
        table = final.new_zeros((0, *final.shape[:-1]))
        premature = torch.full(final.shape[:-1], -1, dtype=torch.int64, device=final.device)
        return DoLaResult(torch.exp(log_q_N), log_q_N, torch.exp(log_q_N), premature, table)
    _check_stacked(stacked, final, "scores_layers", "scores_final")
    if mode == "static":
        layers, static_layer = _resolve_static(layers, static_layer, stacked.shape[0])
    else:
        layers = _check_layers(layers, stacked.shape[0])
    log_q_layers = torch.log_softmax(stacked, dim=-1)
    position, table = _select_log(log_q_N, log_q_layers, compat)
    if mode == "static":
        position = torch.full_like(position, layers.index(static_layer))
    premature = _layer_numbers(position, layers)
    if mode == "off":
        log_p_hat = log_q_N
        premature = torch.full_like(premature, -1)
    else:
        gather = position.unsqueeze(0).unsqueeze(-1).expand(1, *final.shape)  # (1, ..., C)
        log_q_M = torch.take_along_dim(log_q_layers, gather, dim=0).squeeze(0)  # (..., C)
        log_p_hat = _contrast_log(log_q_N, log_q_M, alpha)
    return DoLaResult(torch.exp(log_p_hat), log_p_hat, torch.exp(log_q_N), premature, table)


def _result_out(result: DoLaResult, to_numpy: bool) -> DoLaResult:
    return DoLaResult(*(_out(getattr(result, f.name), to_numpy) for f in dataclasses.fields(result)))


def _check_mode(mode, alpha, compat) -> float:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_compat(compat)
    return _check_alpha(alpha)


def dola(scores_final, scores_layers, layers, mode: str = "dynamic", alpha: float = 0.1,
         static_layer=None, compat=None) -> DoLaResult:
    """DoLa from LOGITS: scores_final [..., C], scores_layers [J, ..., C] (layers: J layer numbers).

    mode "dynamic": per-example M by max JSD; "static": M = static_layer (``layers`` may be None when
    J = 1); "off": probs = q_N, premature_layer = -1 (jsd still computed when scores_layers is given).
    """
    alpha = _check_mode(mode, alpha, compat)
    final, to_numpy = _as_tensor(scores_final, "scores_final")
    _check_logits(final, "scores_final")
    stacked = None
    if scores_layers is not None:
        stacked, _ = _as_tensor(scores_layers, "scores_layers", like=final)
        _check_finite(stacked, "scores_layers")
        final, stacked = _promote(final, stacked)
    result = _dola_tensors(final, stacked, layers, mode, alpha, static_layer, compat)
    return _result_out(result, to_numpy)


def score(z_final, z_layers, text_bank, tau, layers, mode: str = "dynamic", alpha: float = 0.1,
          static_layer=None, compat=None) -> DoLaResult:
    """DoLa from representations: z_final [..., D], z_layers [J, ..., D], text_bank [C, D] -> DoLaResult."""
    alpha = _check_mode(mode, alpha, compat)
    tau = _check_tau(tau)
    final, to_numpy = _as_tensor(z_final, "z_final")
    bank, _ = _as_tensor(text_bank, "text_bank", like=final)
    logits_final = _rep_logits(final, bank, tau, "z_final")  # (..., C)
    logits_layers = None
    if z_layers is not None:
        stacked, _ = _as_tensor(z_layers, "z_layers", like=final)
        _check_stacked(stacked, final, "z_layers", "z_final")
        logits_layers = _rep_logits(stacked, bank, tau, "z_layers")  # (J, ..., C)
        logits_final, logits_layers = _promote(logits_final, logits_layers)
    result = _dola_tensors(logits_final, logits_layers, layers, mode, alpha, static_layer, compat)
    return _result_out(result, to_numpy)
