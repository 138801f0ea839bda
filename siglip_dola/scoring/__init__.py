"""Pure DoLa math for SigLIP zero-shot scoring: tensors/arrays in and out, no I/O, no model classes.

The candidate classes/texts play the role of the vocabulary: q_j = softmax(cos(z_j, t_c) / tau).
Dynamic DoLa picks per example M = argmax_j JSD(q_N || q_j) over the candidate layers, keeps
V_head = {c : q_N(c) >= alpha * max q_N} and returns p_hat = softmax_{V_head}(log q_N - lambda * log q_M),
lambda = ``contrast_weight`` (1: the design note's formula, the default; 0: q_N renormalised on V_head).

Conventions
- torch tensors (any device; fp16/bf16/fp32 computed in float32, float64 kept) and numpy arrays are
  accepted; results are of the input's kind (numpy in -> numpy out), float32 (float64 for float64
  input), on the input's device. Everything is batched over any leading dims ``...``.
- One host sync per call, at its end: shapes, alpha, tau and layers are checked eagerly (metadata);
  NaN/inf/probability checks are device-side values read ONCE after all the math is queued (on CUDA
  it queues behind the forward), raising the ValueError naming the argument. Layer-number tables are
  cached per device, since a host->device copy synchronises too.
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

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from siglip_dola import config
from siglip_dola.scoring import kernel as scoring_kernel
from siglip_dola.scoring.checks import (  # noqa: F401  (MODES, COMPAT_MODES are part of runtime's API)
    COMPAT_MODES, MODES, as_tensor, check_alpha, check_bank, check_classes, check_contrast_weight, check_layers, check_mode,
    check_stacked,
    check_tau, pair, promote, resolve_stacked_layers, to_output,
)

LN2 = math.log(2.0)


@dataclass
class DoLaResult:
    """Output of :func:`dola`; arrays are of the input's kind (torch or numpy)."""

    probs: object            # [..., C] p_hat (q_N for mode "off"); masked classes exactly 0
    log_probs: object        # [..., C] log p_hat; masked classes -inf
    final_probs: object      # [..., C] q_N, the model's own distribution
    premature_layer: object  # [...] int64 layer number M per example (-1 for mode "off")
    jsd: object              # [J, ...] JSD(q_N, q_j) per candidate layer (compat: the official value)
    nonfinite: object = None  # [...] bool rows whose inputs held a NaN/inf; only from score(validate=False)


# ---------------------------------------------------------------- value checks on device, read once
def _finite(x: torch.Tensor, name: str) -> tuple[torch.Tensor, str]:
    """(0-d tensor on x's device, 0 iff x has no NaN/inf: x - x is NaN there; the error); no host read."""
    return (x - x).sum(), f"{name} must be finite (no NaN or inf)"


def _probabilities(x: torch.Tensor, name: str) -> tuple[torch.Tensor, str]:
    """0 iff x is finite and >= 0: |x| - x is > 0 for negatives, NaN for NaN/+inf, inf for -inf."""
    return (x.abs() - x).sum(), f"{name} must hold probabilities: finite, >= 0, no NaN"


def _finish(result: DoLaResult, checks, to_numpy: bool) -> DoLaResult:
    _raise_failed(checks)
    return DoLaResult(*(to_output(getattr(result, f.name), to_numpy) for f in dataclasses.fields(result)
                        if f.name != "nonfinite"))


def _raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """The ONE host read of a call: raise the ValueError of the first failed device-side check."""
    passed = torch.stack([value for value, _ in checks]) == 0  # (K,) bool, on device
    index = torch.arange(len(checks), device=passed.device)
    first_failed = int(torch.where(passed, len(checks), index).min())  # the host sync
    if first_failed < len(checks):
        raise ValueError(checks[first_failed][1])


@functools.lru_cache(maxsize=64)
def _layer_table(layers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[J] int64 layer numbers on device, built once: a host->device copy synchronises on CUDA."""
    with torch.inference_mode(False):
        return torch.tensor(layers, dtype=torch.int64, device=device)


# ---------------------------------------------------------------- log-space core (no host reads)
def _log_finite(probs: torch.Tensor) -> torch.Tensor:
    """log probs with log 0 = the most negative float: its exp is exactly 0, differences stay finite."""
    return torch.log(probs).clamp_min(torch.finfo(probs.dtype).min)


def _rep_logits(reps: torch.Tensor, text_bank: torch.Tensor, tau: float) -> torch.Tensor:
    """s = <z/|z|, t/|t|> / tau: reps [..., D], text_bank [C, D] -> [..., C]; one matmul for all layers."""
    return F.normalize(reps, dim=-1) @ F.normalize(text_bank, dim=-1).T / tau  # (..., C)


def _jsd(log_p, log_q, p, q) -> torch.Tensor:
    """True JSD (natural log) from FINITE log-probs and their probs (broadcast), clamped to [0, ln 2]."""
    log_m = torch.logaddexp(log_p, log_q) - LN2  # log((p + q) / 2), exact where p or q underflow
    terms = p * (log_p - log_m) + q * (log_q - log_m)  # 0 where p, q = 0
    return (0.5 * terms.sum(-1)).clamp(0.0, LN2)


def _official_jsd(log_p, log_q, p, q) -> torch.Tensor:
    """The official DoLa code's value: F.kl_div(log P, M) = KL(M||P), mean over classes."""
    log_p, log_q = torch.broadcast_tensors(log_p, log_q)
    m = 0.5 * (p + q)
    return 0.5 * (F.kl_div(log_p, m, reduction="none").mean(-1) + F.kl_div(log_q, m, reduction="none").mean(-1))


def _select(log_q_N, log_q_layers, q_N, q_layers, compat) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in layers [...] int64, jsd_table [J, ...]) from q_N [..., C], q_j [J, ..., C] and their logs.

    argmax returns the first maximal index, so exact ties go to the layer listed earliest.
    """
    if compat == "official-dola":
        table = _official_jsd(log_q_N.unsqueeze(0), log_q_layers, q_N.unsqueeze(0), q_layers)  # (J, ...)
        batch_best = table.reshape(table.shape[0], -1).mean(-1).argmax()  # one layer for the whole batch
        return batch_best.expand(table.shape[1:]), table
    table = _jsd(log_q_N.unsqueeze(0), log_q_layers, q_N.unsqueeze(0), q_layers)  # (J, ...)
    return table.argmax(dim=0), table


def _contrast_log(log_q_N, log_q_M, alpha: float, q_M_may_be_zero: bool = False,
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


def _dola_log(log_q_N, log_q_layers, layers, mode, alpha, static_layer, compat, contrast_weight=1.0) -> DoLaResult:
    """DoLa from finite log-probs: log_q_N [..., C], log_q_layers [J, ..., C] or None (then mode 'off')."""
    final_probs = torch.exp(log_q_N)
    if log_q_layers is None:
        premature = torch.full(log_q_N.shape[:-1], -1, dtype=torch.int64, device=log_q_N.device)
        return DoLaResult(final_probs, log_q_N, final_probs, premature, log_q_N.new_zeros((0, *log_q_N.shape[:-1])))
    position, table = _select(log_q_N, log_q_layers, final_probs, torch.exp(log_q_layers), compat)
    if mode == "off":
        return DoLaResult(final_probs, log_q_N, final_probs, torch.full_like(position, -1), table)
    if mode == "static":
        position = torch.full_like(position, layers.index(int(static_layer)))
    gather = position[None, ..., None].expand(1, *log_q_N.shape)  # (1, ..., C)
    log_q_M = log_q_layers.gather(0, gather)[0]  # (..., C)
    log_p_hat = _contrast_log(log_q_N, log_q_M, alpha, contrast_weight=contrast_weight)
    premature = _layer_table(tuple(layers), position.device)[position]  # (...)
    return DoLaResult(torch.exp(log_p_hat), log_p_hat, final_probs, premature, table)


# ---------------------------------------------------------------- public API
def build_log_probs_from_rep(z, text_bank, tau):
    """log q [..., C] = log_softmax(cos(z, t_c) / tau) for z [..., D], text_bank [C, D]."""
    z_t, to_numpy = as_tensor(z, "z")
    bank, _ = as_tensor(text_bank, "text_bank", like=z_t)
    tau = check_tau(tau)
    check_bank(bank, z_t, "z")
    z_t, bank = promote(z_t, bank)
    log_q = torch.log_softmax(_rep_logits(z_t, bank, tau), dim=-1)
    _raise_failed([_finite(z_t, "z"), _finite(bank, "text_bank")])
    return to_output(log_q, to_numpy)


def build_probs_from_rep(z, text_bank, tau):
    """q [..., C] = softmax(cos(z, t_c) / tau) for z [..., D], text_bank [C, D]."""
    log_q = build_log_probs_from_rep(z, text_bank, tau)
    return np.exp(log_q) if isinstance(log_q, np.ndarray) else torch.exp(log_q)


def jsd(p, q):
    """True Jensen-Shannon divergence (natural log) over the last axis: p, q [..., C] -> [...], in [0, ln 2]."""
    p_t, q_t, to_numpy = pair(p, q, "p", "q")
    if p_t.shape[-1] != q_t.shape[-1]:
        raise ValueError(f"p and q must have the same number of classes, got {p_t.shape[-1]} and {q_t.shape[-1]}")
    try:
        torch.broadcast_shapes(p_t.shape, q_t.shape)
    except RuntimeError:
        raise ValueError(f"p and q shapes must broadcast, got {list(p_t.shape)} and {list(q_t.shape)}") from None
    value = _jsd(_log_finite(p_t), _log_finite(q_t), p_t, q_t)
    _raise_failed([_probabilities(p_t, "p"), _probabilities(q_t, "q")])
    return to_output(value, to_numpy)


def select_early_exit(q_N, q_layers, layers, compat=None):
    """(premature_layer [...] int64 layer numbers, jsd_table [J, ...]) for q_N [..., C], q_layers [J, ..., C].

    Per example M = argmax_j JSD(q_N, q_j); exact ties go to the layer listed earliest in ``layers``.
    """
    check_mode("dynamic", 0.1, compat)
    q_final, q_stack, to_numpy = pair(q_N, q_layers, "q_N", "q_layers")
    layers = check_layers(layers, q_stack.shape[0])
    check_stacked(q_stack, q_final, "q_layers", "q_N")
    log = torch.log if compat else _log_finite  # the official value keeps log 0 = -inf
    position, table = _select(log(q_final), log(q_stack), q_final, q_stack, compat)
    premature = _layer_table(tuple(layers), position.device)[position]
    _raise_failed([_probabilities(q_final, "q_N"), _probabilities(q_stack, "q_layers")])
    return to_output(premature, to_numpy), to_output(table, to_numpy)


def contrast_and_mask(q_N, q_M, alpha: float = 0.1, contrast_weight: float = 1.0):
    """(p_hat [..., C], log_p_hat [..., C]) = softmax over V_head of log q_N - lambda * log q_M; masked: 0 / -inf."""
    alpha, contrast_weight = check_alpha(alpha), check_contrast_weight(contrast_weight)
    q_final, q_early, to_numpy = pair(q_N, q_M, "q_N", "q_M")
    if q_final.shape != q_early.shape:
        raise ValueError(f"q_N and q_M must have the same shape, got {list(q_final.shape)} and {list(q_early.shape)}")
    log_p_hat = _contrast_log(torch.log(q_final), torch.log(q_early), alpha, q_M_may_be_zero=True,
                              contrast_weight=contrast_weight)
    _raise_failed([_probabilities(q_final, "q_N"), _probabilities(q_early, "q_M"),
                   ((q_final.amax(dim=-1) <= 0).sum(), "q_N must have a positive entry in every row (it is a distribution)")])
    return to_output(torch.exp(log_p_hat), to_numpy), to_output(log_p_hat, to_numpy)


def dola(scores_final, scores_layers, layers, mode: str = "dynamic", alpha: float = 0.1,
         static_layer=None, compat=None, contrast_weight: float = 1.0) -> DoLaResult:
    """DoLa from LOGITS: scores_final [..., C], scores_layers [J, ..., C] (layers: J layer numbers).

    mode "dynamic": per-example M by max JSD; "static": M = static_layer (``layers`` may be None when
    J = 1); "off": probs = q_N, premature_layer = -1 (jsd still computed when scores_layers is given).
    contrast_weight: lambda of F = log q_N - lambda * log q_M (default 1).
    """
    alpha, contrast_weight = check_mode(mode, alpha, compat), check_contrast_weight(contrast_weight)
    final, to_numpy = as_tensor(scores_final, "scores_final")
    check_classes(final, "scores_final")
    checks = [_finite(final, "scores_final")]
    stacked = None
    if scores_layers is not None:
        stacked, _ = as_tensor(scores_layers, "scores_layers", like=final)
        checks.append(_finite(stacked, "scores_layers"))
        final, stacked = promote(final, stacked)
    layers, stacked = resolve_stacked_layers(layers, stacked, final, ("scores_layers", "scores_final"), mode, static_layer)
    log_q_layers = None if stacked is None else torch.log_softmax(stacked, dim=-1)  # (J, ..., C)
    result = _dola_log(torch.log_softmax(final, dim=-1), log_q_layers, layers, mode, alpha, static_layer, compat,
                       contrast_weight)
    return _finish(result, checks, to_numpy)


def score(z_final, z_layers, text_bank, tau, layers, mode: str = "dynamic", alpha: float = 0.1,
          static_layer=None, compat=None, validate: bool = True, contrast_weight: float = 1.0) -> DoLaResult:
    """DoLa from representations: z_final [..., D], z_layers [J, ..., D], text_bank [C, D] -> DoLaResult.

    With compat=None, CUDA logits (fp32, or autocast's bf16/fp16) and C <= scoring_kernel.MAX_CLASSES,
    everything after the logit matmul is ONE Triton kernel (siglip_dola.scoring.kernel; switch:
    ``siglip_dola.config.set_triton_scoring``), computed in fp32 and equal to the eager path up to fp32 rounding.
    validate=False skips the call's one host read (for CUDA-graph capture): no NaN/inf ValueError is raised;
    instead ``result.nonfinite`` [...] bool marks the rows whose inputs held a NaN/inf (check it when you read
    the results; :func:`check_finite` raises the usual error).
    contrast_weight: lambda of F = log q_N - lambda * log q_M (default 1), in both paths.
    """
    if validate is not True and validate is not False:
        raise TypeError(f"validate must be True or False, got {validate!r}")
    contrast_weight = check_contrast_weight(contrast_weight)
    alpha = check_mode(mode, alpha, compat)
    tau = check_tau(tau)
    final, to_numpy = as_tensor(z_final, "z_final")
    bank, _ = as_tensor(text_bank, "text_bank", like=final)
    check_bank(bank, final, "z_final")
    stacked = None if z_layers is None else as_tensor(z_layers, "z_layers", like=final)[0]
    layers, stacked = resolve_stacked_layers(layers, stacked, final, ("z_layers", "z_final"), mode, static_layer)
    reps = final[None] if stacked is None else torch.cat(promote(final[None], stacked))  # (J+1, ..., D)
    reps, bank = promote(reps, bank)
    logits = _rep_logits(reps, bank, tau)  # (J+1, ..., C): final, then the layers
    checks = lambda: _finite_checks(final, bank, stacked)  # noqa: E731  (built lazily: the Triton path skips them)
    if config.use_triton_scoring() and compat is None and logits.is_contiguous():
        rows = logits.view(logits.shape[0], -1, logits.shape[-1])  # (J+1, R, C)
        if scoring_kernel.usable(rows):
            return _score_rows(rows, logits.shape[1:], layers, mode, alpha, static_layer, checks, to_numpy, validate,
                               contrast_weight)
    log_q = torch.log_softmax(logits, dim=-1)  # (J+1, ..., C)
    result = _dola_log(log_q[0], None if stacked is None else log_q[1:], layers, mode, alpha, static_layer, compat,
                       contrast_weight)
    if not validate:   # a NaN/inf anywhere in a row's inputs makes its logits non-finite (F.normalize)
        result.nonfinite = (~torch.isfinite(logits)).any(-1).any(0)  # (...)
        return DoLaResult(*(to_output(getattr(result, f.name), to_numpy) for f in dataclasses.fields(result)))
    return _finish(result, checks(), to_numpy)


def check_finite(result: DoLaResult) -> None:
    """Raise the ValueError of :func:`score` when a ``validate=False`` result has rows with NaN/inf inputs (a host read)."""
    if result.nonfinite is not None and bool(torch.as_tensor(result.nonfinite).any()):
        raise ValueError("z_final, z_layers and text_bank must be finite (no NaN or inf): "
                         f"{int(torch.as_tensor(result.nonfinite).sum())} row(s) held a NaN/inf")


def _finite_checks(final, bank, stacked) -> list[tuple[torch.Tensor, str]]:
    """score's device-side validity checks, in the order their errors are reported."""
    checks = [_finite(final, "z_final"), _finite(bank, "text_bank")]
    if stacked is not None:
        checks.append(_finite(stacked, "z_layers"))
    return checks


def _score_rows(rows, shape, layers, mode, alpha, static_layer, checks, to_numpy, validate=True,
                contrast_weight=1.0) -> DoLaResult:
    """score's Triton path: rows (J+1, R, C) fp32 logits, shape the (..., C) of one layer's logits.

    The kernel's per-row NaN/inf flag replaces the per-argument checks (a NaN/inf in z or the bank makes its
    logits non-finite through F.normalize); only when it is set are they computed, to name the argument.
    """
    table = None if layers is None else _layer_table(tuple(layers), rows.device)
    position = layers.index(int(static_layer)) if mode == "static" else -1
    *outputs, nonfinite = scoring_kernel.dola_rows(rows, table, alpha, mode, position, contrast_weight)
    if validate and bool(nonfinite.any()):  # the ONE host read of the call
        _raise_failed(checks())  # slow path, errors only: which argument held the NaN/inf
    probs, log_probs, final_probs, premature, jsd = outputs
    lead = tuple(shape[:-1])
    outputs = (probs.view(shape), log_probs.view(shape), final_probs.view(shape), premature.view(lead),
               jsd.view(jsd.shape[0], *lead), None if validate else nonfinite.view(lead).bool())
    return DoLaResult(*(None if x is None else to_output(x, to_numpy) for x in outputs))
