"""Fused readout of captured layers through the folded MAP head: one pass over each captured layer.

:class:`siglip_dola.readout.map_head.FoldedMapHead` reduces an intermediate layer's readout to

    pooled[b, h] = sum_t softmax_t(x_hat[b, t] . key_probe[h]) * x_hat[b, t]        # (B, H, D)
    values[b, h] = value_weight[h] @ pooled[b, h] + value_bias[h]                    # (B, H, hd)
    z[b]         = tail(values[b] flattened)                                          # the model's own modules

where x_hat is the LayerNorm of the raw block output without its affine (gamma/beta are folded). The only
work over all T tokens is the first line: :mod:`siglip_dola.readout.kernel` does it in one read per
layer (Triton; PyTorch reference and fallback). :class:`LayerPooler` drives it from the readout's hooks, so
no layer is stored or concatenated; the per-vector part (the split merge with W_v in one kernel, then the
model's proj / norm + MLP) runs once for all layers at the end.

Where block j+1 starts with its own LayerNorm of block j's output (timm ``norm1``, HF ``layer_norm1``: pre-norm
ViTs), layer j is pooled from that norm's output instead (:class:`EntryNorm`): the model computes it anyway,
and n - beta = gamma * x_hat needs no statistics, so the kernel skips its reductions (~25% faster on an H100,
benchmarks/README.md). Exact up to fp32 rounding; used only when the norm's eps equals the final norm's, its
output is fp32 and its input is the very tensor block j returned. A side CUDA stream was measured slower and
stays available as ``FUSED.side_stream``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from siglip_dola.readout.kernel import (  # noqa: F401  (re-exported: tests and benchmarks use fused.*)
    BLOCK_T, combine_partials, merge_values, pool_partials, pool_reference, split_plan, triton, triton_usable,
    values_from_pooled)

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - depends on the environment
    OutOfResources = RuntimeError  # never raised without triton


@dataclass
class FusedConfig:
    """Switches for the fast path (the benchmark flips them to measure each step)."""

    enabled: bool = True        # use the Triton kernel when the tokens are on CUDA and triton imports
    entry_norms: bool = True    # pool from the next block's own LayerNorm output where that is exact
    side_stream: bool = False   # launch per-layer pooling on a side CUDA stream (measured on H100: slower)
    target_programs: int = 0    # programs that run at once, for split_plan (0: the number of SMs)
    num_warps: int = 8          # warps per program (8 was fastest on H100: benchmarks/README.md)
    block_t: int = BLOCK_T      # tokens per inner step
    num_stages: int = 3         # software-pipelining depth of the token loads (Triton's default)


FUSED = FusedConfig()

ENTRY_NORM_NAMES = ("norm1", "layer_norm1")   # a block's first LayerNorm: timm Block, HF SiglipEncoderLayer
ENTRY_BLOCK_TYPES = ("Block", "SiglipEncoderLayer")   # pre-norm blocks whose forward starts with norm(input)
_FP16_SAFE = 3.0e4                            # |gamma * x_hat| <= max|gamma| * sqrt(D) must stay below fp16's max


@dataclass(frozen=True)
class EntryNorm:
    """Block j+1's first LayerNorm, ready to pool layer j from its output n = gamma * x_hat + beta (derived)."""

    module: nn.Module
    probe: torch.Tensor   # (H, D) key_probe / gamma: (n - beta) . probe = x_hat . key_probe
    shift: torch.Tensor   # (D,) beta
    scale: torch.Tensor   # (D,) 1 / gamma: pooled (n - beta) * scale = pooled x_hat


def first_norm(block: nn.Module) -> nn.LayerNorm | None:
    """The LayerNorm a known pre-norm block applies first to its input (timm Block / HF SiglipEncoderLayer), or None."""
    if type(block).__name__ not in ENTRY_BLOCK_TYPES:
        return None
    return next((getattr(block, name) for name in ENTRY_NORM_NAMES
                 if isinstance(getattr(block, name, None), nn.LayerNorm)), None)


@torch.no_grad()
def entry_norm(block: nn.Module, folded) -> EntryNorm | None:
    """The EntryNorm of ``block`` for the folded head, or None where pooling its output would not be exact."""
    norm = first_norm(block)
    dim = folded.key_probe.shape[-1]
    if (norm is None or folded.norm_eps is None or norm.weight is None or float(norm.eps) != folded.norm_eps
            or tuple(norm.normalized_shape) != (dim,)):
        return None
    gamma = norm.weight.detach().to(folded.key_probe)
    beta = norm.bias.detach().to(gamma) if norm.bias is not None else torch.zeros_like(gamma)
    magnitude = gamma.abs()
    if not (torch.isfinite(gamma).all() and torch.isfinite(beta).all() and magnitude.min() > 0):
        return None
    # precision guards: n - beta must stay fp16-safe and keep its bits (fp32 rounding of n is ~6e-8 |beta|)
    if (magnitude.max() * dim ** 0.5 > _FP16_SAFE or (beta.abs() / magnitude).max() > 1e3
            or magnitude.max() / magnitude.min() > 1e4):
        return None
    return EntryNorm(norm, (folded.key_probe / gamma).contiguous(), beta.contiguous(), (1.0 / gamma).contiguous())


# ---------------------------------------------------------------- streaming driver for the block loop
_SIDE_STREAMS: dict = {}
_FITTING_STAGES: dict = {}   # LayerPooler._stage_key(...) (its last field: shifted) -> stages that fit (0: none)


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def tensor_version(tokens: torch.Tensor) -> int | None:
    """The in-place version counter; None for inference-mode tensors, which have none (then only
    ENTRY_BLOCK_TYPES, whose forwards do not write their input, guard the held block output)."""
    return None if tokens.is_inference() else tokens._version


class LayerPooler:
    """Reads out each captured layer as the forward produces it; :meth:`result` -> z_layers (J, B, D_out).

    ``folded`` is a :class:`~siglip_dola.readout.map_head.FoldedMapHead`. In a block loop or hook call
    ``pooler.add(slot, tokens)`` right after block j (slot = position of j in the requested layers), or
    ``pooler.hold(slot, tokens)`` there and ``pooler.add_entry(slot, entry, norm_input, normed)`` from block
    j+1's first LayerNorm; then ``pooler.result()`` once. The first pooled layer decides the path for all.
    """

    def __init__(self, folded, num_slots: int, config: FusedConfig = FUSED):
        self.folded, self.num_slots, self.config = folded, num_slots, config
        self._pooled: list = [None] * num_slots   # PyTorch path: (B, H, D) per slot
        self._fast = None                          # decided on the first pooled layer
        self._out = self._lse = self._stream = self._tokens_per_split = None
        self._launched = False                     # a fast launch succeeded in this call
        self._held: dict = {}                      # slot -> (block output, its _version) awaiting add_entry
        self.entry_slots = 0                       # slots pooled from an EntryNorm's output

    def _start_fast(self, tokens: torch.Tensor) -> None:
        batch, num_tokens, dim = tokens.shape
        heads = self.folded.key_probe.shape[0]
        make = lambda *shape: torch.empty(*shape, device=tokens.device, dtype=torch.float32)
        target = self.config.target_programs or (   # one 8-warp program fills an SM (192 KiB of shared memory)
            torch.cuda.get_device_properties(tokens.device).multi_processor_count if tokens.is_cuda else 4)
        self._tokens_per_split, splits = split_plan(batch, num_tokens, target, self.config.block_t)
        self._out, self._lse = make(self.num_slots, batch, heads, splits, dim), make(self.num_slots, batch, heads, splits)
        if tokens.is_cuda and self.config.side_stream:
            self._stream = _side_stream(tokens.device)

    def _stage_key(self, tokens: torch.Tensor, shifted: bool) -> tuple:
        cfg = self.config
        return tokens.device, tokens.dtype, tokens.shape[-1], cfg.block_t, cfg.num_warps, cfg.num_stages, shifted

    def _decide(self, tokens: torch.Tensor, shifted: bool) -> None:
        self._fast = (self.config.enabled and triton_usable(tokens, self.folded.key_probe)
                      and _FITTING_STAGES.get(self._stage_key(tokens, shifted)) != 0)
        if self._fast:
            self._start_fast(tokens)

    def _launch(self, slot: int, tokens: torch.Tensor, entry: EntryNorm | None = None) -> None:
        key = self._stage_key(tokens, entry is not None)
        stages = _FITTING_STAGES.get(key, self.config.num_stages)
        probe, eps = (self.folded.key_probe, self.folded.norm_eps) if entry is None else (entry.probe, None)
        shifted = {} if entry is None else dict(shift=entry.shift, scale=entry.scale)
        while True:   # fewer load stages where shared memory is short (an A100 allows 163 KiB per program)
            try:
                pool_partials(tokens, probe, eps, self._out[slot], self._lse[slot], self._tokens_per_split,
                              self.config.num_warps, self.config.block_t, stages, **shifted)
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
            self._decide(tokens, shifted=False)
        if not self._fast:
            self._pooled[slot] = pool_reference(tokens, self.folded.key_probe, self.folded.norm_eps)
            return
        # any strides: timm's residual stream is stored (B, D, T) (strides (T*D, 1, T)); a copy would cost more
        self._launch_fast(slot, tokens, None, tokens)

    def hold(self, slot: int, tokens: torch.Tensor) -> None:
        """Keep block j's output (a reference, no copy) until :meth:`add_entry` or :meth:`result` pools it."""
        self._held[slot] = (tokens, tensor_version(tokens))

    def add_entry(self, slot: int, entry: EntryNorm, norm_input: torch.Tensor, normed: torch.Tensor) -> None:
        """Pool a held slot from block j+1's first LayerNorm, called with its input and output (B, T, D)."""
        if slot not in self._held:
            return                                 # this norm ran again in the same forward: the slot is done
        tokens = self._take(slot)
        exact = (self.config.entry_norms and norm_input is tokens and normed.dtype == torch.float32
                 and normed.shape == tokens.shape)
        if exact and self._fast is None:
            self._decide(normed, shifted=True)
        if not (exact and self._fast):
            self.add(slot, tokens)
            return
        self.entry_slots += 1
        self._launch_fast(slot, normed, entry, tokens)

    def _take(self, slot: int) -> torch.Tensor:
        tokens, version = self._held.pop(slot)
        if tensor_version(tokens) != version:
            raise RuntimeError(f"the block after layer slot {slot} modified that layer's output in place before "
                               "its first norm; the fused readout cannot read it (pass FusedConfig(entry_norms=False))")
        return tokens

    def _launch_fast(self, slot: int, tokens: torch.Tensor, entry: EntryNorm | None, raw: torch.Tensor) -> None:
        if self._stream is None:
            try:
                self._launch(slot, tokens, entry)
            except OutOfResources:   # fits nowhere here: the first launch sends the whole call to PyTorch
                if self._launched:
                    raise            # (a later one cannot: earlier slots are in the fast buffers)
                self._fast = False
                self.add(slot, raw)
                return
            self._launched = True
            return
        self._stream.wait_stream(torch.cuda.current_stream(tokens.device))   # the tokens are written
        with torch.cuda.stream(self._stream):
            self._launch(slot, tokens, entry)
        tokens.record_stream(self._stream)  # the allocator keeps the tokens until the side stream is done

    def result(self) -> torch.Tensor:
        """z_layers (J, B, D_out) for all slots (every slot must have been added or held)."""
        for slot in sorted(self._held):            # held layers whose next norm never ran: pool the block output
            self.add(slot, self._take(slot))
        folded = self.folded
        if self._fast:
            if self._stream is not None:
                torch.cuda.current_stream(self._out.device).wait_stream(self._stream)
            num_slots, batch = self._out.shape[:2]
            values = merge_values(self._out.flatten(0, 1), self._lse.flatten(0, 1), folded.value_weight,
                                  folded.value_bias)                                 # (J * B, H * hd)
        else:
            assert all(p is not None for p in self._pooled), "every slot must be added before result()"
            pooled = torch.stack(self._pooled)                                   # (J, B, H, D), small
            num_slots, batch = pooled.shape[:2]
            values = values_from_pooled(pooled.flatten(0, 1), folded.value_weight, folded.value_bias)
        z_layers = folded.tail(values.to(folded.tail_dtype))                     # (J * B, D_out)
        return z_layers.reshape(num_slots, batch, -1)


def pooler_for(folded, device: torch.device, num_slots: int, config: FusedConfig = FUSED) -> LayerPooler | None:
    """A LayerPooler when the fast path may apply (folded head, CUDA, Triton, enabled), else None."""
    usable = (folded is not None and num_slots > 0 and config.enabled and triton is not None
              and torch.device(device).type == "cuda" and folded.key_probe.dtype == torch.float32)
    return LayerPooler(folded, num_slots, config) if usable else None
