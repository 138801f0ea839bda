"""One Triton kernel for all of DoLa's scoring after the cosine-logit matmul (scoring.score's fast path).

The eager path launches ~40 small kernels per call (log_softmax, the JSD table, argmax, gather, head
mask, contrast, exp, finiteness flags); on CUDA at small batch their launch cost is the whole overhead
budget. Here ONE program per example row does everything in registers: log_softmax of the final row,
a loop over the J candidate layers (log_softmax, true JSD, running argmax and the chosen layer's log
q_M), then the head mask, the contrast log q_N - lambda * log q_M and its log_softmax. The math is the eager
reference ``scoring.logspace.dola_log`` with ``compat=None``, in log space (finite for logits up to +-1e4);
exact JSD ties go to the earliest layer.

Used only for fp32/bf16/fp16 (computed in fp32), contiguous logits on CUDA (or with TRITON_INTERPRET=1, Triton's CPU interpreter,
which the tests use) and C <= MAX_CLASSES (one block holds a whole row); everything else stays eager.
"""
from __future__ import annotations

import math

import torch

from siglip_dola import config
from siglip_dola.modes import Mode

try:  # optional: scoring.score's eager path is always available
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

MAX_CLASSES = 8192  # one block of classes per row; larger banks keep the eager path
HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
LN2 = math.log(2.0)


def usable(logits: torch.Tensor) -> bool:
    """True when dola_rows can run on logits (J+1, R, C): triton imports, contiguous, CUDA or interpreter.

    fp32, or bf16/fp16 (under autocast the cosine matmul returns those; the kernel computes in fp32 like
    the eager path's autocast log_softmax)."""
    interpreted = config.triton_interpreted()
    return (triton is not None and logits.dtype in HALF_OR_FLOAT and logits.is_contiguous()
            and (logits.is_cuda or interpreted) and logits.ndim == 3 and logits.shape[1] >= 1
            and 1 <= logits.shape[2] <= MAX_CLASSES)


if triton is not None:
    @triton.jit
    def _log_softmax_row(row_ptr, offs, mask):
        """(logits row as loaded, its log_softmax, 1 where the row holds a NaN/inf) for one block of classes."""
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)    # (BLOCK_C,) finite in the tail
        row_max = tl.max(tl.where(mask, x, -float("inf")), axis=0)
        shifted = x - row_max                                                # as torch: (x - max) - log(sum)
        total = tl.sum(tl.where(mask, tl.exp(shifted), 0.0), axis=0)
        bad = tl.max(tl.where(mask & ~(tl.abs(x) < float("inf")), 1, 0), axis=0)  # NaN fails < too
        return shifted - tl.log(total), bad

    @triton.jit
    def _jsd(log_p, log_q, mask):
        """True JSD (natural log) of two finite log-prob rows, clamped to [0, ln 2]."""
        big = tl.maximum(log_p, log_q)
        log_m = big + tl.log(1.0 + tl.exp(-tl.abs(log_p - log_q))) - 0.6931471805599453  # log((p + q) / 2)
        terms = tl.exp(log_p) * (log_p - log_m) + tl.exp(log_q) * (log_q - log_m)
        value = 0.5 * tl.sum(tl.where(mask, terms, 0.0), axis=0)
        return tl.minimum(tl.maximum(value, 0.0), 0.6931471805599453)

    @triton.jit
    def _dola_row_kernel(logits_ptr, layer_ptr, probs_ptr, log_probs_ptr, final_ptr, premature_ptr, jsd_ptr,
                         bad_ptr, R, C, layer_stride, J, static_position, log_alpha, contrast_weight,
                         MODE: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < C
        log_q_N, bad = _log_softmax_row(logits_ptr + row * C, offs, mask)          # (BLOCK_C,)
        tl.store(final_ptr + row * C + offs, tl.exp(log_q_N), mask=mask)
        best = tl.zeros((), tl.float32) - 1.0
        best_j = tl.zeros((), tl.int32)
        log_q_M = log_q_N
        for j in range(J):
            log_q_j, bad_j = _log_softmax_row(logits_ptr + (j + 1) * layer_stride + row * C, offs, mask)
            bad = tl.maximum(bad, bad_j)
            value = _jsd(log_q_N, log_q_j, mask)
            tl.store(jsd_ptr + j * R + row, value)
            if MODE == 0:
                better = value > best                                              # strict: ties keep the earliest
                log_q_M = tl.where(better, log_q_j, log_q_M)
                best_j = tl.where(better, j, best_j)
                best = tl.where(better, value, best)
            elif MODE == 1:
                log_q_M = tl.where(j == static_position, log_q_j, log_q_M)
        tl.store(bad_ptr + row, bad)
        if MODE == 2:
            tl.store(log_probs_ptr + row * C + offs, log_q_N, mask=mask)
            tl.store(premature_ptr + row, tl.zeros((), tl.int64) - 1)
        else:
            if MODE == 1:
                best_j = tl.zeros((), tl.int32) + static_position
            head = mask & (log_q_N >= tl.max(tl.where(mask, log_q_N, -float("inf")), axis=0) + log_alpha)
            contrast = tl.where(head, log_q_N - contrast_weight * log_q_M, -float("inf"))  # V_head only
            contrast_max = tl.max(contrast, axis=0)                                # finite: argmax q_N is kept
            total = tl.sum(tl.exp(contrast - contrast_max), axis=0)
            log_p_hat = (contrast - contrast_max) - tl.log(total)
            tl.store(log_probs_ptr + row * C + offs, log_p_hat, mask=mask)
            tl.store(probs_ptr + row * C + offs, tl.exp(log_p_hat), mask=mask)     # exactly 0 off V_head
            tl.store(premature_ptr + row, tl.load(layer_ptr + best_j))


def _num_warps(block_c: int) -> int:
    """Enough threads that a row's few live vectors stay in registers."""
    return 4 if block_c <= 1024 else 8 if block_c <= 4096 else 16


def dola_rows(logits: torch.Tensor, layer_numbers: torch.Tensor | None, alpha: float, mode: Mode,
              static_position: int = -1, contrast_weight: float = 1.0):
    """DoLa per row from logits (J+1, R, C): index 0 the final layer, then the J candidates.

    Returns (probs (R, C), log_probs (R, C), final_probs (R, C), premature (R,) int64 layer numbers,
    jsd (J, R), nonfinite (R,) int32: 1 where the row's logits hold a NaN/inf in any layer).
    mode: a modes.MODES entry with a kernel_code (the MODE branch below: 0 dynamic, 1 static, 2 off).
    layer_numbers (J,) int64 on logits' device (may be None for mode "off"); static_position indexes it.
    contrast_weight: lambda of the contrast log q_N - lambda * log q_M (log q_M is finite here, so 0 is exact).
    """
    code = mode.kernel_code
    assert usable(logits) and code in (0, 1, 2), (logits.shape, logits.dtype, mode.name)
    num_layers, rows, classes = logits.shape[0] - 1, logits.shape[1], logits.shape[2]
    assert num_layers >= 1 or code == 2, "only mode 'off' works without candidate layers"
    assert code != 1 or 0 <= static_position < num_layers, static_position
    final_probs = torch.empty((rows, classes), dtype=torch.float32, device=logits.device)
    log_probs = torch.empty_like(final_probs)
    probs = final_probs if code == 2 else torch.empty_like(final_probs)
    premature = torch.empty(rows, dtype=torch.int64, device=logits.device)
    jsd = torch.empty((num_layers, rows), dtype=torch.float32, device=logits.device)
    nonfinite = torch.empty(rows, dtype=torch.int32, device=logits.device)
    layer_numbers = premature if layer_numbers is None else layer_numbers  # unread for mode "off"
    block_c = triton.next_power_of_2(classes)
    _dola_row_kernel[(rows,)](logits, layer_numbers, probs, log_probs, final_probs, premature, jsd, nonfinite,
                              rows, classes, rows * classes, num_layers, int(static_position), math.log(alpha),
                              float(contrast_weight),
                              MODE=code, BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return probs, log_probs, final_probs, premature, jsd, nonfinite
