"""Fused readout of captured layers through the folded MAP head: one pass over each (B, T, D) layer.

:class:`siglip_dola.readout.map_head.FoldedMapHead` reduces an intermediate layer's readout to

    pooled[b, h] = sum_t softmax_t(x_hat[b, t] . key_probe[h]) * x_hat[b, t]        # (B, H, D)
    values[b, h] = value_weight[h] @ pooled[b, h] + value_bias[h]                    # (B, H, hd)
    z[b]         = tail(values[b] flattened)                                          # the model's own modules

where x_hat is the LayerNorm of the raw block output without its affine (gamma/beta are folded).
The only work over all T tokens is the first line. :func:`pool_partials` does it in ONE read of the
tokens as a Triton kernel (LayerNorm statistics, (T, D) x (D, H) logits, online softmax over tokens,
(H, T) x (T, D) weighted sum), any token strides (timm's residual stream is (B, D, T) in memory);
:func:`pool_reference` is the PyTorch path, fallback and test reference. The per-vector part (W_v,
the model's proj / norm + MLP) then runs once for all layers (:func:`values_from_pooled`,
``folded.tail``) as batched small GEMMs. :class:`LayerPooler` drives this from the readout's block
hooks, so no layer is stored or concatenated. A two-pass variant (logits, then weighted sum) and
launching on a side CUDA stream were measured slower on an H100 (benchmarks/README.md); the side
stream stays available as ``FUSED.side_stream``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional: the PyTorch path below is always available
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    OutOfResources = RuntimeError  # never raised without triton

BLOCK_T = 16  # tokens per inner step (the smallest tl.dot tile)


@dataclass
class FusedConfig:
    """Switches for the fast path (the benchmark flips them to measure each step)."""

    enabled: bool = True        # use the Triton kernel when the tokens are on CUDA and triton imports
    side_stream: bool = False   # launch per-layer pooling on a side CUDA stream (measured on H100: slower)
    target_programs: int = 0    # grid size to aim for (0: 2 x the number of SMs)
    num_warps: int = 8          # warps per program (8 was fastest on H100: benchmarks/README.md)
    block_t: int = BLOCK_T      # tokens per inner step
    num_stages: int = 3         # software-pipelining depth of the token loads (Triton's default)


FUSED = FusedConfig()


# ---------------------------------------------------------------- pooling over tokens
def pool_reference(tokens: torch.Tensor, key_probe: torch.Tensor, norm_eps: float | None) -> torch.Tensor:
    """PyTorch path: tokens (B, T, D) raw block output, key_probe (H, D) -> pooled x_hat (B, H, D)."""
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x_hat = tokens.to(key_probe.dtype)
        if norm_eps is not None:
            x_hat = F.layer_norm(x_hat, x_hat.shape[-1:], eps=norm_eps)          # (B, T, D) no affine
        weights = torch.softmax(x_hat @ key_probe.T, dim=1)                      # (B, T, H) over tokens
        return torch.einsum("bth,btd->bhd", weights, x_hat)


if triton is not None:

    @triton.jit
    def _pool_partial_kernel(x_ptr, probe_ptr, out_ptr, lse_ptr, T, D, stride_b, stride_t, stride_d,
                             tokens_per_split, num_splits, eps,
                             H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                             NORMALIZE: tl.constexpr, EVEN_T: tl.constexpr, EVEN_D: tl.constexpr):
        """One (image, token split): LayerNorm stats, logits, online softmax, weighted sum; one read.

        EVEN_T (every step holds BLOCK_T tokens) and EVEN_D (D == BLOCK_D) drop the masks, so the loads
        along the contiguous token axis vectorise: ~10% faster on an H100 (benchmarks/README.md, run 12)."""
        b = tl.program_id(0)
        split = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, H)
        d_mask = offs_d < D
        probe = tl.load(probe_ptr + offs_h[None, :] * D + offs_d[:, None], mask=d_mask[:, None], other=0.0)  # (BD, H)
        # dots in fp16 (fp32 accumulate): more mantissa than bf16, same speed, the interpreter gets it right
        probe_scale = tl.maximum(tl.max(tl.abs(probe)), 1e-30)
        probe = (probe / probe_scale).to(tl.float16)  # |probe / scale| <= 1: no overflow
        run_max = tl.full([H], float("-inf"), tl.float32)
        run_sum = tl.zeros([H], tl.float32)
        acc = tl.zeros([H, BLOCK_D], tl.float32)
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
            x = x.to(tl.float16)  # normalised: |x_hat| <= sqrt(D), no overflow
            logits = tl.dot(x, probe, out_dtype=tl.float32) * probe_scale                   # (BT, H)
            if not EVEN_T:
                logits = tl.where(t_mask[:, None], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            rescale = tl.exp(run_max - new_max)
            probs = tl.exp(logits - new_max[None, :])                                       # (BT, H)
            run_sum = run_sum * rescale + tl.sum(probs, axis=0)
            weighted = tl.dot(tl.trans(probs.to(tl.float16)), x, out_dtype=tl.float32)      # (H, BD)
            acc = acc * rescale[:, None] + weighted
            run_max = new_max
        rows = (b * H + offs_h) * num_splits + split                                        # (H,) in (B, H, S)
        tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], acc / run_sum[:, None], mask=d_mask[None, :])
        tl.store(lse_ptr + rows, run_max + tl.log(run_sum))


def triton_usable(tokens: torch.Tensor, key_probe: torch.Tensor) -> bool:
    """True when the Triton kernel can run here (CUDA tokens, or the CPU interpreter) at the caller's precision.

    The kernel's products are fp16 x fp16 -> fp32 (relative error ~1e-3), so it serves half-precision
    tokens or fp32 tokens under a half-precision autocast (timm's residual stream stays fp32 there);
    plain fp32 keeps the exact PyTorch path.
    """
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    half = tokens.dtype in (torch.bfloat16, torch.float16) or (
        tokens.dtype == torch.float32 and torch.is_autocast_enabled(tokens.device.type)
        and torch.get_autocast_dtype(tokens.device.type) in (torch.bfloat16, torch.float16))
    return triton is not None and (tokens.is_cuda or interpreted) and key_probe.dtype == torch.float32 and half


def split_plan(batch: int, num_tokens: int, target_programs: int, block_t: int = BLOCK_T) -> tuple[int, int]:
    """(tokens_per_split, num_splits): about target_programs programs in all, no split empty."""
    max_splits = math.ceil(num_tokens / block_t)
    splits = max(1, min(max_splits, math.ceil(target_programs / max(batch, 1))))
    tokens_per_split = math.ceil(math.ceil(num_tokens / splits) / block_t) * block_t
    return tokens_per_split, math.ceil(num_tokens / tokens_per_split)


def pool_partials(tokens: torch.Tensor, key_probe: torch.Tensor, norm_eps: float | None, out: torch.Tensor,
                  lse: torch.Tensor, tokens_per_split: int, num_warps: int = 8, block_t: int = BLOCK_T,
                  num_stages: int = 3) -> None:
    """Triton: tokens (B, T, D) -> out (B, H, S, D) per-split pooled x_hat, lse (B, H, S), both fp32.

    Grid (B, S): one program per (image, token split), all heads and all of D, one read of its tokens.
    """
    batch, num_tokens, dim = tokens.shape
    heads, num_splits = key_probe.shape[0], out.shape[2]
    assert out.shape == (batch, heads, num_splits, dim) and lse.shape == (batch, heads, num_splits)
    assert out.is_contiguous() and lse.is_contiguous() and key_probe.is_contiguous()
    assert (num_splits - 1) * tokens_per_split < num_tokens <= num_splits * tokens_per_split
    assert tokens_per_split % block_t == 0
    _pool_partial_kernel[(batch, num_splits)](
        tokens, key_probe, out, lse, num_tokens, dim, *tokens.stride(),
        tokens_per_split, num_splits, 0.0 if norm_eps is None else norm_eps,
        H=heads, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(dim), NORMALIZE=norm_eps is not None,
        EVEN_T=num_tokens % block_t == 0, EVEN_D=dim == triton.next_power_of_2(dim),
        num_warps=num_warps, num_stages=num_stages)


def combine_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge token splits: out (..., H, S, D), lse (..., H, S) -> pooled (..., H, D).

    One batched (1 x S) @ (S x D) product per head: reads the partials once (no (..., H, S, D)
    temporary), in the partials' dtype (fp32) with autocast off: a bf16 matmul would round the pooled vectors.
    """
    with torch.autocast(device_type=out.device.type, enabled=False):
        weights = torch.softmax(lse, dim=-1)                                     # (..., H, S)
        return (weights.unsqueeze(-2) @ out).squeeze(-2)                         # (..., H, D)


def values_from_pooled(pooled: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor) -> torch.Tensor:
    """pooled (N, H, D), value_weight (H, hd, D), value_bias (H, hd) -> head values (N, H * hd)."""
    with torch.autocast(device_type=pooled.device.type, enabled=False):
        values = torch.bmm(pooled.transpose(0, 1), value_weight.transpose(1, 2))  # (H, N, hd)
        return (values.transpose(0, 1) + value_bias).flatten(1)                   # (N, H * hd)


# ---------------------------------------------------------------- streaming driver for the block loop
_SIDE_STREAMS: dict = {}
_FITTING_STAGES: dict = {}   # (device, dtype, D, block_t, warps, stages asked) -> stages that fit (0: none)


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class LayerPooler:
    """Reads out each captured layer as the forward produces it; :meth:`result` -> z_layers (J, B, D_out).

    ``folded`` is a :class:`~siglip_dola.readout.map_head.FoldedMapHead`. In a block loop or hook call
    ``pooler.add(slot, tokens)`` right after block j (slot = position of j in the requested layers),
    then ``pooler.result()`` once. No tokens are kept. The first layer decides the path for all.
    """

    def __init__(self, folded, num_slots: int, config: FusedConfig = FUSED):
        self.folded, self.num_slots, self.config = folded, num_slots, config
        self._pooled: list = [None] * num_slots   # PyTorch path: (B, H, D) per slot
        self._fast = None                          # decided on the first add()
        self._out = self._lse = self._stream = self._tokens_per_split = None
        self._launched = False                     # a fast launch succeeded in this call

    def _start_fast(self, tokens: torch.Tensor) -> None:
        batch, num_tokens, dim = tokens.shape
        heads = self.folded.key_probe.shape[0]
        make = lambda *shape: torch.empty(*shape, device=tokens.device, dtype=torch.float32)
        target = self.config.target_programs or (
            2 * torch.cuda.get_device_properties(tokens.device).multi_processor_count if tokens.is_cuda else 4)
        self._tokens_per_split, splits = split_plan(batch, num_tokens, target, self.config.block_t)
        self._out, self._lse = make(self.num_slots, batch, heads, splits, dim), make(self.num_slots, batch, heads, splits)
        if tokens.is_cuda and self.config.side_stream:
            self._stream = _side_stream(tokens.device)

    def _stage_key(self, tokens: torch.Tensor) -> tuple:
        cfg = self.config
        return tokens.device, tokens.dtype, tokens.shape[-1], cfg.block_t, cfg.num_warps, cfg.num_stages

    def _launch(self, slot: int, tokens: torch.Tensor) -> None:
        key = self._stage_key(tokens)
        stages = _FITTING_STAGES.get(key, self.config.num_stages)
        while True:   # fewer load stages where shared memory is short (an A100 allows 163 KiB per program)
            try:
                pool_partials(tokens, self.folded.key_probe, self.folded.norm_eps, self._out[slot], self._lse[slot],
                              self._tokens_per_split, self.config.num_warps, self.config.block_t, stages)
                _FITTING_STAGES[key] = stages
                return
            except OutOfResources:
                if stages <= 1:
                    _FITTING_STAGES[key] = 0   # fits nowhere here: later calls go straight to PyTorch
                    raise
                stages -= 1

    def add(self, slot: int, tokens: torch.Tensor) -> None:
        """Pool one captured layer: tokens (B, T, D), the raw block output."""
        if self._fast is None:
            self._fast = (self.config.enabled and triton_usable(tokens, self.folded.key_probe)
                          and _FITTING_STAGES.get(self._stage_key(tokens)) != 0)
            if self._fast:
                self._start_fast(tokens)
        if not self._fast:
            self._pooled[slot] = pool_reference(tokens, self.folded.key_probe, self.folded.norm_eps)
            return
        # any strides: timm's residual stream is stored (B, D, T) (strides (T*D, 1, T)); a copy would cost more
        if self._stream is None:
            try:
                self._launch(slot, tokens)
            except OutOfResources:   # fits nowhere here: the first launch sends the whole call to PyTorch
                if self._launched:
                    raise            # (a later one cannot: earlier slots are in the fast buffers)
                self._fast = False
                self.add(slot, tokens)
                return
            self._launched = True
            return
        self._stream.wait_stream(torch.cuda.current_stream(tokens.device))   # the tokens are written
        with torch.cuda.stream(self._stream):
            self._launch(slot, tokens)
        tokens.record_stream(self._stream)  # the allocator keeps the tokens until the side stream is done

    def result(self) -> torch.Tensor:
        """z_layers (J, B, D_out) for all slots (every slot must have been added)."""
        if self._fast:
            if self._stream is not None:
                torch.cuda.current_stream(self._out.device).wait_stream(self._stream)
            pooled = combine_partials(self._out, self._lse)                      # (J, B, H, D)
        else:
            assert all(p is not None for p in self._pooled), "every slot must be added before result()"
            pooled = torch.stack(self._pooled)                                   # (J, B, H, D), small
        num_slots, batch = pooled.shape[:2]
        values = values_from_pooled(pooled.flatten(0, 1), self.folded.value_weight, self.folded.value_bias)
        z_layers = self.folded.tail(values.to(self.folded.tail_dtype))           # (J * B, D_out)
        return z_layers.reshape(num_slots, batch, -1)


def pooler_for(folded, device: torch.device, num_slots: int, config: FusedConfig = FUSED) -> LayerPooler | None:
    """A LayerPooler when the fast path may apply (folded head, CUDA, Triton, enabled), else None."""
    usable = (folded is not None and num_slots > 0 and config.enabled and triton is not None
              and torch.device(device).type == "cuda" and folded.key_probe.dtype == torch.float32)
    return LayerPooler(folded, num_slots, config) if usable else None
