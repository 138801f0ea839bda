"""Whole-DoLa calls: :func:`dola` from logits and :func:`score` from representations (what the scorer runs).

Both check their inputs eagerly, queue the log-space core (logspace.dola_log) and read the device-side value
checks once, at the end. :func:`score` hands everything after the cosine-logit matmul to the one Triton
kernel (scoring/kernel.py) where it is usable; ``validate=False`` defers the host read (CUDA-graph capture).
"""
from __future__ import annotations

import dataclasses

import torch

from siglip_dola import config
from siglip_dola.scoring import kernel
from siglip_dola.scoring.checks import (
    Call, as_tensor, call_settings, check_bank, check_classes, check_tau, finite_check, promote, raise_failed,
    resolve_stacked_layers, to_output,
)
from siglip_dola.scoring.logspace import DoLaResult, dola_log, layer_table, rep_logits


def dola(scores_final, scores_layers, settings=None, mode: str | None = None, alpha: float | None = None,
         static_layer=None, compat=None, contrast_weight: float | None = None, *, layers=None) -> DoLaResult:
    """DoLa from LOGITS: scores_final [..., C], scores_layers [J, ..., C].

    settings: a DoLaSettings (its mode, layers = the J stacked layer numbers, static_layer, alpha,
    contrast_weight), or the keyword form: ``layers`` (J layer numbers; also accepted in settings' place) and
    mode / alpha / static_layer / contrast_weight (defaults "dynamic", 0.1, None, 1). Modes: siglip_dola.modes
    ("dynamic": per-example M by max JSD; "static": M = static_layer, ``layers`` may be None when J = 1;
    "off": probs = q_N, premature_layer = -1, jsd still computed when scores_layers is given).
    contrast_weight: lambda of F = log q_N - lambda * log q_M.
    """
    call = call_settings(_settings_or_layers(settings, layers), mode, alpha, static_layer, contrast_weight, compat)
    final, to_numpy = as_tensor(scores_final, "scores_final")
    check_classes(final, "scores_final")
    checks = [finite_check(final, "scores_final")]
    stacked = None
    if scores_layers is not None:
        stacked, _ = as_tensor(scores_layers, "scores_layers", like=final)
        checks.append(finite_check(stacked, "scores_layers"))
        final, stacked = promote(final, stacked)
    layers, stacked = resolve_stacked_layers(call.layers, stacked, final, ("scores_layers", "scores_final"),
                                             call.mode, call.static_layer)
    log_q_layers = None if stacked is None else torch.log_softmax(stacked, dim=-1)  # (J, ..., C)
    result = dola_log(torch.log_softmax(final, dim=-1), log_q_layers, layers, call.mode, call.alpha,
                      call.static_layer, compat, call.contrast_weight)
    return _finish(result, checks, to_numpy)


def score(z_final, z_layers, text_bank, tau, settings=None, mode: str | None = None, alpha: float | None = None,
          static_layer=None, compat=None, validate: bool = True, contrast_weight: float | None = None, *,
          layers=None) -> DoLaResult:
    """DoLa from representations: z_final [..., D], z_layers [J, ..., D], text_bank [C, D] -> DoLaResult.

    settings: a DoLaSettings, or the keyword form (``layers=`` and mode / alpha / ...), as in :func:`dola`.

    With compat=None, CUDA logits (fp32, or autocast's bf16/fp16) and C <= kernel.MAX_CLASSES,
    everything after the logit matmul is ONE Triton kernel (siglip_dola.scoring.kernel; switch:
    ``siglip_dola.config.set_triton_scoring``), computed in fp32 and equal to the eager path up to fp32 rounding.
    validate=False skips the call's one host read (for CUDA-graph capture): no NaN/inf ValueError is raised;
    instead ``result.nonfinite`` [...] bool marks the rows whose inputs held a NaN/inf (check it when you read
    the results; :func:`check_finite` raises the usual error).
    contrast_weight: lambda of F = log q_N - lambda * log q_M (default 1), in both paths.
    """
    if validate is not True and validate is not False:
        raise TypeError(f"validate must be True or False, got {validate!r}")
    call = call_settings(_settings_or_layers(settings, layers), mode, alpha, static_layer, contrast_weight, compat)
    tau = check_tau(tau)
    final, to_numpy = as_tensor(z_final, "z_final")
    bank, _ = as_tensor(text_bank, "text_bank", like=final)
    check_bank(bank, final, "z_final")
    stacked = None if z_layers is None else as_tensor(z_layers, "z_layers", like=final)[0]
    layers, stacked = resolve_stacked_layers(call.layers, stacked, final, ("z_layers", "z_final"), call.mode,
                                             call.static_layer)
    reps = final[None] if stacked is None else torch.cat(promote(final[None], stacked))  # (J+1, ..., D)
    reps, bank = promote(reps, bank)
    logits = rep_logits(reps, bank, tau)  # (J+1, ..., C): final, then the layers
    checks = lambda: _finite_checks(final, bank, stacked)  # noqa: E731  (built lazily: the Triton path skips them)
    if config.use_triton_scoring() and compat is None and call.mode.kernel_code is not None and logits.is_contiguous():
        rows = logits.view(logits.shape[0], -1, logits.shape[-1])  # (J+1, R, C)
        if kernel.usable(rows):
            return _score_rows(rows, logits.shape[1:], layers, call, checks, to_numpy, validate)
    log_q = torch.log_softmax(logits, dim=-1)  # (J+1, ..., C)
    result = dola_log(log_q[0], None if stacked is None else log_q[1:], layers, call.mode, call.alpha,
                      call.static_layer, compat, call.contrast_weight)
    if not validate:   # a NaN/inf anywhere in a row's inputs makes its logits non-finite (F.normalize)
        result.nonfinite = (~torch.isfinite(logits)).any(-1).any(0)  # (...)
        return DoLaResult(*(to_output(getattr(result, f.name), to_numpy) for f in dataclasses.fields(result)))
    return _finish(result, checks(), to_numpy)


def check_finite(result: DoLaResult) -> None:
    """Raise the ValueError of :func:`score` when a ``validate=False`` result has rows with NaN/inf inputs (a host read)."""
    if result.nonfinite is not None and bool(torch.as_tensor(result.nonfinite).any()):
        raise ValueError("z_final, z_layers and text_bank must be finite (no NaN or inf): "
                         f"{int(torch.as_tensor(result.nonfinite).sum())} row(s) held a NaN/inf")


def _finish(result: DoLaResult, checks, to_numpy: bool) -> DoLaResult:
    raise_failed(checks)
    return DoLaResult(*(to_output(getattr(result, f.name), to_numpy) for f in dataclasses.fields(result)
                        if f.name != "nonfinite"))


def _finite_checks(final, bank, stacked) -> list[tuple[torch.Tensor, str]]:
    """score's device-side validity checks, in the order their errors are reported."""
    checks = [finite_check(final, "z_final"), finite_check(bank, "text_bank")]
    if stacked is not None:
        checks.append(finite_check(stacked, "z_layers"))
    return checks


def _settings_or_layers(settings, layers):
    """The keyword form's ``layers=`` stands in for settings (both given: a TypeError naming them)."""
    if layers is not None and settings is not None:
        raise TypeError("pass either settings (or the layer numbers in its place) or layers=, not both")
    return settings if layers is None else layers


def _score_rows(rows, shape, layers, call: Call, checks, to_numpy, validate=True) -> DoLaResult:
    """score's Triton path: rows (J+1, R, C) fp32 logits, shape the (..., C) of one layer's logits.

    The kernel's per-row NaN/inf flag replaces the per-argument checks (a NaN/inf in z or the bank makes its
    logits non-finite through F.normalize); only when it is set are they computed, to name the argument.
    """
    table = None if layers is None else layer_table(tuple(layers), rows.device)
    position = layers.index(int(call.static_layer)) if call.mode.fixed_layer else -1
    *outputs, nonfinite = kernel.dola_rows(rows, table, call.alpha, call.mode, position, call.contrast_weight)
    if validate and bool(nonfinite.any()):  # the ONE host read of the call
        raise_failed(checks())  # slow path, errors only: which argument held the NaN/inf
    probs, log_probs, final_probs, premature, jsd = outputs
    lead = tuple(shape[:-1])
    outputs = (probs.view(shape), log_probs.view(shape), final_probs.view(shape), premature.view(lead),
               jsd.view(jsd.shape[0], *lead), None if validate else nonfinite.view(lead).bool())
    return DoLaResult(*(None if x is None else to_output(x, to_numpy) for x in outputs))
