"""EXPERIMENTAL opt-in fused path of :func:`siglip_dola.scoring.score`: ``runtime.score(..., fused=True)``.

The eager ``runtime.score`` launches ~40 small kernels per call (normalise, matmul, log_softmax, JSD table,
argmax, gather, head mask, contrast, exp, device-side validity flags). Here the same math, written with
the SAME helpers of runtime.py, is compiled with ``torch.compile`` (inductor, ``dynamic=False``, fullgraph):
shapes, dtypes, device, mode, compat, static layer, alpha and tau are part of the compile cache key, so
each new combination compiles once (seconds) and later calls reuse it. The single host read (the
validity flags, raising the ValueError naming the argument) stays OUTSIDE the compiled region, at the
end, as in the eager path. Metadata checks (shapes, alpha, tau, mode, layers) are the eager ones.

Results equal the eager path's up to float rounding (inductor reorders reductions); the chosen layer is
the same except where two layers' JSD differ by rounding only. Default stays eager: this path costs a
compile per new shape and is only worth it where launch overhead dominates (CUDA, small C).
"""
from __future__ import annotations

import functools

import torch

from siglip_dola import scoring as rt
from siglip_dola.scoring.checks import check_bank, resolve_stacked_layers, to_output, to_tensor

RECOMPILE_LIMIT = 64  # distinct (shape, dtype, mode, ...) combinations compiled before raising


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (as runtime_checks.as_tensor + promote)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _core(final, stacked, bank, layer_table, *, dtype, tau, alpha, mode, static_position, compat):
    """All of score's math, no host reads: final [..., D], stacked [J, ..., D] or None, bank [C, D].

    Returns (probs, log_probs, final_probs, premature, jsd_table, first_failed): first_failed is a 0-d
    int64 index of the first failed validity check (== number of checks when all pass).
    """
    final, bank = final.to(dtype), bank.to(dtype)
    flags = [rt._finite(final, "")[0], rt._finite(bank, "")[0]]
    reps = final[None]
    if stacked is not None:
        stacked = stacked.to(dtype)
        flags.append(rt._finite(stacked, "")[0])
        reps = torch.cat([reps, stacked])  # (J+1, ..., D)
    log_q = torch.log_softmax(rt._rep_logits(reps, bank, tau), dim=-1)  # (J+1, ..., C)
    log_q_N, final_probs = log_q[0], torch.exp(log_q[0])
    passed = torch.stack(flags) == 0  # (K,)
    first_failed = torch.where(passed, len(flags), torch.arange(len(flags), device=passed.device)).min()
    if stacked is None:
        premature = torch.full(log_q_N.shape[:-1], -1, dtype=torch.int64, device=log_q_N.device)
        return final_probs, log_q_N, final_probs, premature, log_q_N.new_zeros((0, *log_q_N.shape[:-1])), first_failed
    log_q_layers = log_q[1:]
    position, table = rt._select(log_q_N, log_q_layers, final_probs, torch.exp(log_q_layers), compat)
    if mode == "off":
        return final_probs, log_q_N, final_probs, torch.full_like(position, -1), table, first_failed
    if mode == "static":
        position = torch.full_like(position, static_position)
    gather = position[None, ..., None].expand(1, *log_q_N.shape)  # (1, ..., C)
    log_p_hat = rt._contrast_log(log_q_N, log_q_layers.gather(0, gather)[0], alpha)
    return torch.exp(log_p_hat), log_p_hat, final_probs, layer_table[position], table, first_failed


def _recompile_settings() -> dict:
    """Raise (never silently fall back to eager) past RECOMPILE_LIMIT compiled variants; names vary by torch."""
    wanted = dict(recompile_limit=RECOMPILE_LIMIT, cache_size_limit=RECOMPILE_LIMIT,
                  fail_on_recompile_limit_hit=True, fail_on_cache_limit_hit=True)
    settings = {k: v for k, v in wanted.items() if hasattr(torch._dynamo.config, k)}
    return settings if "recompile_limit" not in settings else {k: v for k, v in settings.items() if "cache" not in k}


@functools.lru_cache(maxsize=1)
def _compiled_core():
    return torch.compile(_core, dynamic=False, fullgraph=True)


def score_fused(z_final, z_layers, text_bank, tau, layers, mode, alpha, static_layer, compat) -> rt.DoLaResult:
    """runtime.score's contract (see there), the math compiled; called by ``runtime.score(..., fused=True)``."""
    alpha, tau = rt.check_mode(mode, alpha, compat), rt.check_tau(tau)
    final, to_numpy = to_tensor(z_final, "z_final", None)
    bank, _ = to_tensor(text_bank, "text_bank", final.device)
    check_bank(bank, final, "z_final")
    stacked = None if z_layers is None else to_tensor(z_layers, "z_layers", final.device)[0]
    layers, stacked = resolve_stacked_layers(layers, stacked, final, ("z_layers", "z_final"), mode, static_layer)
    messages = [f"{name} must be finite (no NaN or inf)" for name in ("z_final", "text_bank", "z_layers")]
    static_position = layers.index(int(static_layer)) if mode == "static" else -1
    table = None if layers is None else rt._layer_table(tuple(layers), final.device)
    with torch._dynamo.config.patch(_recompile_settings()):
        *outputs, first_failed = _compiled_core()(
            final, stacked, bank, table, dtype=_compute_dtype(final, stacked, bank), tau=tau, alpha=alpha,
            mode=mode, static_position=static_position, compat=compat)
    first_failed = int(first_failed)  # the ONE host read of the call
    if first_failed < 2 + (stacked is not None):
        raise ValueError(messages[first_failed])
    return rt.DoLaResult(*(to_output(x, to_numpy) for x in outputs))
