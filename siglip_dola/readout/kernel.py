"""Pooling of one captured layer through the folded MAP head: the Triton kernel, its PyTorch reference, the merge.

For tokens x (B, T, D) and per-head key probes p (H, D) (:class:`~siglip_dola.readout.map_head.FoldedMapHead`):

    x_hat[b, t]  = LayerNorm(x[b, t]) without affine                                  # (B, T, D)
    pooled[b, h] = sum_t softmax_t(x_hat[b, t] . p[h]) * x_hat[b, t]                   # (B, H, D)

:func:`pool_partials` does this in ONE read of the tokens (LayerNorm statistics, (T, D) x (D, H) logits,
online softmax over tokens, (H, T) x (T, D) weighted sum), per (image, token split); :func:`merge_values`
merges the splits and applies the head's value weights in one more launch (:func:`combine_partials` and
``map_head.head_values`` are its PyTorch form). Its "shifted" mode reads the output of the next block's own LayerNorm instead,
n = gamma * x_hat + beta (the model computes it anyway): then n - beta = gamma * x_hat needs no statistics,
the probe is p / gamma and the pooled vector is scaled by 1 / gamma at the end (see entry_norm.EntryNorm).
The PyTorch reference (path, fallback and test reference) is ``map_head.pool_tokens``.
"""
from __future__ import annotations

import math

import torch

from siglip_dola import config
from siglip_dola.readout.map_head import head_values

try:  # optional: the PyTorch path below is always available
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

BLOCK_T = 16  # tokens per inner step (the smallest tl.dot tile)
MAX_SPLITS = 8  # more splits than this cost the merge more than they saved (batch 1: 36 splits, walked in sequence)
_MERGE_TILE = 8192  # fp32 elements of the merge's (rows, splits, k) tile: 64 registers a thread at 4 warps




if triton is not None:

    @triton.jit
    def _pool_partial_kernel(x_ptr, probe_ptr, shift_ptr, scale_ptr, out_ptr, lse_ptr, T, D, stride_b, stride_t,
                             stride_d, tokens_per_split, num_splits, eps,
                             H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                             NORMALIZE: tl.constexpr, SHIFTED: tl.constexpr, K_GROUPS: tl.constexpr,
                             EVEN_T: tl.constexpr, EVEN_D: tl.constexpr):
        """One (image, token split): x_hat (from stats or a shift), logits, online softmax, weighted sum; one read.

        EVEN_T / EVEN_D drop the masks (vector loads). K_GROUPS > 1 splits the logits'
        D-reduction into a batched (K_GROUPS, BT, BD / K_GROUPS) product, so no warp repeats the whole of it."""
        b = tl.program_id(0)
        split = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)   # heads padded to a power of two >= 16 (tl.dot's smallest tile)
        d_mask = offs_d < D
        h_mask = offs_h < H
        probe = tl.load(probe_ptr + offs_h[None, :] * D + offs_d[:, None], mask=d_mask[:, None] & h_mask[None, :],
                        other=0.0)                                                                  # (BD, BH)
        # dots in fp16 (fp32 accumulate): more mantissa than bf16, same speed, the interpreter gets it right
        probe_scale = tl.maximum(tl.max(tl.abs(probe)), 1e-30)
        probe = (probe / probe_scale).to(tl.float16)  # |probe / scale| <= 1: no overflow
        if SHIFTED:
            shift = tl.load(shift_ptr + offs_d, mask=d_mask, other=0.0)                            # (BD,) beta
        run_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        t_start = split * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            t0 = tl.multiple_of(t0, BLOCK_T)  # t_start is a multiple of BLOCK_T: aligned vector loads
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < t_end
            ptrs = x_ptr + b * stride_b + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
            if EVEN_T and EVEN_D:
                x = tl.load(ptrs).to(tl.float32)                                             # (BT, BD)
            else:
                x = tl.load(ptrs, mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            if NORMALIZE:
                mean = tl.sum(x, axis=1) / D
                centred = x - mean[:, None] if EVEN_D else tl.where(d_mask[None, :], x - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)           # (BT,) once per token
                x = centred * rstd[:, None]
            if SHIFTED:
                x = x - shift[None, :]                                                      # gamma * x_hat
            x = x.to(tl.float16)  # |x_hat| <= sqrt(D); shifted: the caller bounds gamma (no overflow)
            if K_GROUPS == 1:
                logits = tl.dot(x, probe, out_dtype=tl.float32)                             # (BT, BH)
            else:
                x_groups = tl.permute(tl.reshape(x, [BLOCK_T, K_GROUPS, BLOCK_D // K_GROUPS]), [1, 0, 2])
                probe_groups = tl.reshape(probe, [K_GROUPS, BLOCK_D // K_GROUPS, BLOCK_H])
                logits = tl.sum(tl.dot(x_groups, probe_groups, out_dtype=tl.float32), axis=0)  # (BT, BH)
            logits = logits * probe_scale
            if not EVEN_T:
                logits = tl.where(t_mask[:, None], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            rescale = tl.exp(run_max - new_max)
            probs = tl.exp(logits - new_max[None, :])                                       # (BT, BH)
            run_sum = run_sum * rescale + tl.sum(probs, axis=0)
            weighted = tl.dot(tl.trans(probs.to(tl.float16)), x, out_dtype=tl.float32)      # (BH, BD)
            acc = acc * rescale[:, None] + weighted
            run_max = new_max
        pooled = acc / run_sum[:, None]
        if SHIFTED:
            pooled = pooled * tl.load(scale_ptr + offs_d, mask=d_mask, other=0.0)[None, :]  # x_hat = n' / gamma
        rows = (b * H + offs_h) * num_splits + split                                        # (BH,) in (B, H, S)
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], pooled, mask=h_mask[:, None] & d_mask[None, :])
        tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=h_mask)


    @triton.jit
    def _merge_values_kernel(out_ptr, lse_ptr, weight_ptr, bias_ptr, values_ptr, N, S, D, HD,
                             H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_HD: tl.constexpr, PRECISION: tl.constexpr):
        """Rows n, head h: values[n, h] = W_v[h] @ sum_s softmax_s(lse[n, h, s]) out[n, h, s] + b[h] (merge + W_v)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_e = tl.arange(0, BLOCK_HD)
        rows = offs_n.to(tl.int64) * H + h                                                   # (BN,) in (N, H)
        n_mask, s_mask, e_mask = offs_n < N, offs_s < S, offs_e < HD
        lse = tl.load(lse_ptr + rows[:, None] * S + offs_s[None, :], mask=n_mask[:, None] & s_mask[None, :], other=0.0)
        lse = tl.where(s_mask[None, :], lse, float("-inf"))                                  # (BN, BS)
        weights = tl.exp(lse - tl.max(lse, axis=1)[:, None])
        weights = weights / tl.sum(weights, axis=1)[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_HD], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            # every split of the block in ONE load: a loop of S dependent loads per k-step makes the merge
            # latency-bound at small N (benchmarks/README.md)
            parts = tl.load(out_ptr + (rows[:, None, None] * S + offs_s[None, :, None]) * D + offs_k[None, None, :],
                            mask=n_mask[:, None, None] & s_mask[None, :, None] & k_mask[None, None, :],
                            other=0.0)                                                       # (BN, BS, BK)
            pooled = tl.sum(weights[:, :, None] * parts, axis=1)                             # (BN, BK)
            value_weight = tl.load(weight_ptr + (h * HD + offs_e[None, :]) * D + offs_k[:, None],
                                   mask=k_mask[:, None] & e_mask[None, :], other=0.0)       # (BK, BHD) = W_v[h]^T
            acc = tl.dot(pooled, value_weight, acc, input_precision=PRECISION)
        acc += tl.load(bias_ptr + h * HD + offs_e, mask=e_mask, other=0.0)[None, :]
        tl.store(values_ptr + offs_n[:, None].to(tl.int64) * (H * HD) + h * HD + offs_e[None, :], acc,
                 mask=n_mask[:, None] & e_mask[None, :])


def merge_values_triton(out: torch.Tensor, lse: torch.Tensor, value_weight: torch.Tensor,
                        value_bias: torch.Tensor) -> torch.Tensor:
    """Merge the token splits and apply W_v in one Triton launch: out (N, H, S, D), lse (N, H, S), value_weight
    (H, hd, D), value_bias (H, hd) fp32 -> head values (N, H * hd) fp32, as head_values(combine_partials()).

    Products in 3 x TF32 (fp32-level accuracy on tensor cores); the pooled vectors are never written out. One launch
    instead of torch's batched (1 x S) @ (S x D) merge (timed in benchmarks/README.md)."""
    num_rows, heads, num_splits, dim = out.shape
    head_dim = value_weight.shape[1]
    assert out.is_contiguous() and lse.is_contiguous() and value_weight.is_contiguous() and value_bias.is_contiguous()
    assert out.dtype == lse.dtype == value_weight.dtype == value_bias.dtype == torch.float32
    values = torch.empty(num_rows, heads * head_dim, device=out.device, dtype=torch.float32)
    # 16-row blocks (tl.dot's least M) up to batch 8 x 23 layers: more programs, 64-wide k-steps; 64 rows past it
    block_n, block_s = (16 if num_rows <= 256 else 64), triton.next_power_of_2(num_splits)
    block_k = max(16, min(64, _MERGE_TILE // (block_n * block_s)))   # the (BN, BS, BK) partials tile stays in registers
    _merge_values_kernel[(triton.cdiv(num_rows, block_n), heads)](
        out, lse, value_weight, value_bias, values, num_rows, num_splits, dim, head_dim, H=heads, BLOCK_N=block_n,
        BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_HD=max(16, triton.next_power_of_2(head_dim)),
        PRECISION="tf32x3", num_warps=4)
    return values


def merge_values(out: torch.Tensor, lse: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor):
    """The fast path's merge + W_v: out (N, H, S, D), lse (N, H, S) -> values (N, H * hd); Triton on CUDA (or in
    the interpreter), else :func:`combine_partials` then ``map_head.head_values``."""
    tensors = (out, lse, value_weight, value_bias)
    if triton is not None and (out.is_cuda or config.triton_interpreted()) and all(t.dtype == torch.float32 for t in tensors):
        return merge_values_triton(*(t.contiguous() for t in tensors))
    return head_values(combine_partials(out, lse), value_weight, value_bias)


def triton_usable(tokens: torch.Tensor, key_probe: torch.Tensor) -> bool:
    """True when the Triton kernel can run here (CUDA tokens, or the CPU interpreter) at the caller's precision.

    The kernel's products are fp16 x fp16 -> fp32 (relative error ~1e-3), so it serves half-precision
    tokens or fp32 tokens under a half-precision autocast (timm's residual stream stays fp32 there);
    plain fp32 keeps the exact PyTorch path.
    """
    interpreted = config.triton_interpreted()
    half = tokens.dtype in (torch.bfloat16, torch.float16) or (
        tokens.dtype == torch.float32 and torch.is_autocast_enabled(tokens.device.type)
        and torch.get_autocast_dtype(tokens.device.type) in (torch.bfloat16, torch.float16))
    return triton is not None and (tokens.is_cuda or interpreted) and key_probe.dtype == torch.float32 and half


def split_plan(batch: int, num_tokens: int, slots: int, block_t: int = BLOCK_T) -> tuple[int, int]:
    """(tokens_per_split, num_splits) for a (batch, num_splits) grid of which ``slots`` programs run at once.

    Picks the split count with the shortest modelled time, waves x (token blocks per split + 1) (the +1: a
    program's fixed cost, the probe load and the partial store), at most ceil(slots / batch) splits, no split
    empty, at most MAX_SPLITS; ties go to fewer splits. Whole waves matter: at batch 64 x 576 tokens on an H100 (132 SMs, one
    program each) 2 splits (128 programs, one wave) beat 5 (320 programs, 2.4 waves) by 15% (benchmarks/README.md).
    """
    num_blocks = math.ceil(num_tokens / block_t)
    most = min(num_blocks, MAX_SPLITS, max(1, math.ceil(slots / max(batch, 1))))
    best = None
    for splits in range(1, most + 1):
        blocks_per_split = math.ceil(num_blocks / splits)
        used = math.ceil(num_blocks / blocks_per_split)             # splits that hold tokens
        cost = math.ceil(batch * used / max(slots, 1)) * (blocks_per_split + 1)
        if best is None or cost < best[0]:
            best = (cost, blocks_per_split * block_t, used)
    return best[1], best[2]


def pool_partials(tokens: torch.Tensor, key_probe: torch.Tensor, norm_eps: float | None, out: torch.Tensor,
                  lse: torch.Tensor, tokens_per_split: int, num_warps: int = 8, block_t: int = BLOCK_T,
                  num_stages: int = 3, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> None:
    """Triton: tokens (B, T, D) -> out (B, H, S, D) per-split pooled x_hat, lse (B, H, S), both fp32.

    Grid (B, S): one program per (image, token split), all heads and all of D, one read of its tokens.
    Shifted mode (``shift``, ``scale`` (D,) given, ``norm_eps`` None): tokens are a LayerNorm's output
    gamma * x_hat + beta, shift = beta, scale = 1 / gamma, key_probe = probe / gamma.
    """
    batch, num_tokens, dim = tokens.shape
    heads, num_splits = key_probe.shape[0], out.shape[2]
    shifted = shift is not None
    assert out.shape == (batch, heads, num_splits, dim) and lse.shape == (batch, heads, num_splits)
    assert out.is_contiguous() and lse.is_contiguous() and key_probe.is_contiguous()
    assert (num_splits - 1) * tokens_per_split < num_tokens <= num_splits * tokens_per_split
    assert tokens_per_split % block_t == 0 and (scale is not None) == shifted and not (shifted and norm_eps)
    block_d = triton.next_power_of_2(dim)
    _pool_partial_kernel[(batch, num_splits)](
        tokens, key_probe, shift if shifted else key_probe, scale if shifted else key_probe, out, lse,
        num_tokens, dim, *tokens.stride(), tokens_per_split, num_splits, 0.0 if norm_eps is None else norm_eps,
        H=heads, BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_T=block_t, BLOCK_D=block_d,
        NORMALIZE=norm_eps is not None, SHIFTED=shifted,
        K_GROUPS=min(4, max(1, block_d // 16)) if shifted else 1,   # fastest per mode (benchmarks/README.md)
        EVEN_T=num_tokens % block_t == 0, EVEN_D=dim == block_d, num_warps=num_warps, num_stages=num_stages)


def combine_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge token splits: out (..., H, S, D), lse (..., H, S) -> pooled (..., H, D).

    One batched (1 x S) @ (S x D) product per head: reads the partials once (no (..., H, S, D)
    temporary), in the partials' dtype (fp32) with autocast off: a bf16 matmul would round the pooled vectors.
    """
    with torch.autocast(device_type=out.device.type, enabled=False):
        weights = torch.softmax(lse, dim=-1)                                     # (..., H, S)
        return (weights.unsqueeze(-2) @ out).squeeze(-2)                         # (..., H, D)
