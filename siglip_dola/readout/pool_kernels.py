"""Candidate Triton kernels for the folded-head pooling of one captured layer (issue #8 experiments).

Both compute, for tokens x (B, T, D) (any strides) and per-head key probes p (H, D),

    x_hat[t]     = (x[t] - mean_t) * rstd_t                      (no affine; skipped when norm_eps is None)
    pooled[b, h] = sum_t softmax_t(x_hat[t] . p_h) x_hat[t]      # (B, H, D)

using linearity so that x is never normalised element by element:

    x_hat[t] . p_h      = rstd_t * (x[t] . p_h - mean_t * sum_d p_h)
    sum_t w_th x_hat[t] = sum_t (w_th rstd_t) x[t] - sum_t (w_th rstd_t) mean_t

``rawdot``: one pass, one program per (image, token split), online softmax, raw x in both products
(tf32 tensor cores), partials merged like :func:`siglip_dola.readout.fused.combine_partials`.
``twostage``: (1) LayerNorm statistics and logits, tiles (64 tokens x 64 channels) along the D loop,
written to a small (B, T, H) buffer; (2) per (image, 64-channel block) the softmax over all tokens and
the weighted sum, tiles along T; writes pooled (B, H, D) directly. Two reads of x, both streamed in
the residual stream's own layout (timm's tokens are contiguous along T).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def block_heads(heads: int) -> int:
    """Heads padded to a tl.dot-sized power of two (>= 16)."""
    return max(16, 1 << (heads - 1).bit_length())


if triton is not None:

    @triton.jit
    def _rawdot_partial_kernel(x_ptr, probe_ptr, out_ptr, lse_ptr, T, D, stride_b, stride_t, stride_d,
                               tokens_per_split, num_splits, eps, H: tl.constexpr, BLOCK_H: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
                               PRECISION: tl.constexpr):
        """One (image, token split): stats, logits and weighted sum from raw x, one read, online softmax."""
        b = tl.program_id(0)
        split = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)
        d_mask = offs_d < D
        probe = tl.load(probe_ptr + offs_h[None, :] * D + offs_d[:, None],
                        mask=d_mask[:, None] & (offs_h[None, :] < H), other=0.0)                # (BD, BH)
        probe_sum = tl.sum(probe, axis=0)                                                      # (BH,)
        run_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_H], tl.float32)
        shift = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        t_start = split * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < t_end
            x = tl.load(x_ptr + b * stride_b + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d,
                        mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)       # (BT, BD)
            logits = tl.dot(x, probe, input_precision=PRECISION)                                # (BT, BH)
            weight_scale = tl.full([BLOCK_T], 1.0, tl.float32)
            if NORMALIZE:
                mean = tl.sum(x, axis=1) / D
                var = tl.maximum(tl.sum(x * x, axis=1) / D - mean * mean, 0.0)
                weight_scale = 1.0 / tl.sqrt(var + eps)                                         # rstd (BT,)
                logits = weight_scale[:, None] * (logits - mean[:, None] * probe_sum[None, :])
            logits = tl.where(t_mask[:, None], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            rescale = tl.exp(run_max - new_max)
            probs = tl.exp(logits - new_max[None, :])                                          # (BT, BH)
            run_sum = run_sum * rescale + tl.sum(probs, axis=0)
            weights = probs * weight_scale[:, None]
            if NORMALIZE:
                shift = shift * rescale + tl.sum(weights * mean[:, None], axis=0)
            acc = acc * rescale[:, None] + tl.dot(tl.trans(weights), x, input_precision=PRECISION)
            run_max = new_max
        rows = (b * H + offs_h) * num_splits + split                                           # (BH,) in (B, H, S)
        h_mask = offs_h < H
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], (acc - shift[:, None]) / run_sum[:, None],
                 mask=h_mask[:, None] & d_mask[None, :])
        tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=h_mask)

    @triton.jit
    def _stats_logits_kernel(x_ptr, probe_ptr, logits_ptr, stats_ptr, B, T, D, stride_b, stride_t, stride_d,
                             num_t_blocks, eps, H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr, REVERSE: tl.constexpr,
                             PRECISION: tl.constexpr):
        """Stage 1, one (image, token block): mean, rstd (Chan's merge over D chunks) and the logits."""
        pid = tl.program_id(0)
        b = pid // num_t_blocks
        if REVERSE:  # the images written last by the block are the likeliest still in L2
            b = B - 1 - b
        offs_t = (pid % num_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_h = tl.arange(0, BLOCK_H)
        t_mask = offs_t < T
        dots = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
        mean = tl.zeros([BLOCK_T], tl.float32)
        m2 = tl.zeros([BLOCK_T], tl.float32)
        probe_sum = tl.zeros([BLOCK_H], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            x = tl.load(x_ptr + b * stride_b + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d,
                        mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)       # (BT, BD)
            probe = tl.load(probe_ptr + offs_h[None, :] * D + offs_d[:, None],
                            mask=d_mask[:, None] & (offs_h[None, :] < H), other=0.0)            # (BD, BH)
            dots += tl.dot(x, probe, input_precision=PRECISION)
            probe_sum += tl.sum(probe, axis=0)
            if NORMALIZE:  # Chan et al.: merge this chunk's mean / M2 into the running ones (no cancellation)
                count = tl.minimum(D - d0, BLOCK_D) * 1.0
                chunk_mean = tl.sum(x, axis=1) / count
                centred = tl.where(d_mask[None, :], x - chunk_mean[:, None], 0.0)
                delta = chunk_mean - mean
                seen = d0 * 1.0
                mean += delta * count / (seen + count)
                m2 += tl.sum(centred * centred, axis=1) + delta * delta * seen * count / (seen + count)
        rstd = tl.full([BLOCK_T], 1.0, tl.float32)
        logits = dots
        if NORMALIZE:
            rstd = 1.0 / tl.sqrt(m2 / D + eps)
            logits = rstd[:, None] * (dots - mean[:, None] * probe_sum[None, :])
        rows = b * T + offs_t                                                                  # (BT,)
        tl.store(logits_ptr + rows[:, None] * BLOCK_H + offs_h[None, :], logits, mask=t_mask[:, None])
        tl.store(stats_ptr + rows * 2, mean, mask=t_mask)
        tl.store(stats_ptr + rows * 2 + 1, rstd, mask=t_mask)

    @triton.jit
    def _weighted_sum_kernel(x_ptr, logits_ptr, stats_ptr, out_ptr, B, T, D, stride_b, stride_t, stride_d,
                             num_d_blocks, H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr):
        """Stage 2, one (image, channel block): softmax over all T tokens, then sum_t w x[t] on its channels."""
        pid = tl.program_id(0)
        b = pid // num_d_blocks
        if REVERSE:
            b = B - 1 - b
        offs_d = (pid % num_d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)
        d_mask = offs_d < D
        run_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_H], tl.float32)
        for t0 in range(0, T, BLOCK_T):  # logits are (T, BH) per image: a few KB, read from L2
            offs_t = t0 + tl.arange(0, BLOCK_T)
            logits = tl.load(logits_ptr + (b * T + offs_t)[:, None] * BLOCK_H + offs_h[None, :],
                             mask=(offs_t < T)[:, None], other=float("-inf"))                  # (BT, BH)
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[None, :]), axis=0)
            run_max = new_max
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        shift = tl.zeros([BLOCK_H], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < T
            rows = b * T + offs_t
            logits = tl.load(logits_ptr + rows[:, None] * BLOCK_H + offs_h[None, :], mask=t_mask[:, None],
                             other=float("-inf"))
            mean = tl.load(stats_ptr + rows * 2, mask=t_mask, other=0.0)
            rstd = tl.load(stats_ptr + rows * 2 + 1, mask=t_mask, other=0.0)
            weights = tl.exp(logits - run_max[None, :]) * rstd[:, None]                        # (BT, BH)
            x = tl.load(x_ptr + b * stride_b + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d,
                        mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)       # (BT, BD)
            acc += tl.dot(tl.trans(weights), x, input_precision=PRECISION)                      # (BH, BD)
            shift += tl.sum(weights * mean[:, None], axis=0)
        pooled = (acc - shift[:, None]) / run_sum[:, None]
        tl.store(out_ptr + (b * H + offs_h)[:, None] * D + offs_d[None, :], pooled,
                 mask=(offs_h < H)[:, None] & d_mask[None, :])


def rawdot_partials(tokens, key_probe, norm_eps, out, lse, tokens_per_split, num_warps=8, block_t=16,
                    num_stages=3, precision="tf32") -> None:
    """Like :func:`siglip_dola.readout.fused.pool_partials` (out (B, H, S, D), lse (B, H, S)), raw-x products."""
    batch, num_tokens, dim = tokens.shape
    heads, num_splits = key_probe.shape[0], out.shape[2]
    assert out.shape == (batch, heads, num_splits, dim) and lse.shape == (batch, heads, num_splits)
    _rawdot_partial_kernel[(batch, num_splits)](
        tokens, key_probe, out, lse, num_tokens, dim, *tokens.stride(), tokens_per_split, num_splits,
        0.0 if norm_eps is None else norm_eps, H=heads, BLOCK_H=block_heads(heads), BLOCK_T=block_t,
        BLOCK_D=triton.next_power_of_2(dim), NORMALIZE=norm_eps is not None, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages)


def two_stage_buffers(batch: int, num_tokens: int, heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, BH), stats (B, T, 2)) scratch for :func:`two_stage_pool`, reusable layer after layer."""
    logits = torch.empty(batch, num_tokens, block_heads(heads), device=device, dtype=torch.float32)
    return logits, torch.empty(batch, num_tokens, 2, device=device, dtype=torch.float32)


def two_stage_pool(tokens, key_probe, norm_eps, out, scratch, block_t=64, block_d=64, num_warps=4,
                   num_stages=3, reverse=(True, False), precision="tf32") -> None:
    """tokens (B, T, D) -> out (B, H, D) pooled x_hat, fp32; scratch from :func:`two_stage_buffers`."""
    batch, num_tokens, dim = tokens.shape
    heads = key_probe.shape[0]
    logits, stats = scratch
    assert out.shape == (batch, heads, dim) and out.is_contiguous() and key_probe.is_contiguous()
    t_blocks, d_blocks = triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d)
    common = dict(H=heads, BLOCK_H=block_heads(heads), BLOCK_T=block_t, BLOCK_D=block_d, PRECISION=precision,
                  num_warps=num_warps, num_stages=num_stages)
    _stats_logits_kernel[(batch * t_blocks,)](
        tokens, key_probe, logits, stats, batch, num_tokens, dim, *tokens.stride(), t_blocks,
        0.0 if norm_eps is None else norm_eps, NORMALIZE=norm_eps is not None, REVERSE=reverse[0], **common)
    _weighted_sum_kernel[(batch * d_blocks,)](
        tokens, logits, stats, out, batch, num_tokens, dim, *tokens.stride(), d_blocks, REVERSE=reverse[1],
        **common)
