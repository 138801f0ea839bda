"""The folded-head layer pooler: each layer pooled by the Triton kernel as the forward produces it, PyTorch otherwise.

:class:`~siglip_dola.readout.map_head.FoldedMapHead` reduces an intermediate layer's readout to

    pooled[b, h] = sum_t softmax_t(x_hat[b, t] . key_probe[h]) * x_hat[b, t]        # (B, H, D)
    values[b, h] = value_weight[h] @ pooled[b, h] + value_bias[h]                    # (B, H, hd)
    z[b]         = tail(values[b] flattened)                                          # the model's own modules

where x_hat is the LayerNorm of the raw block output without its affine (gamma/beta are folded). The first
line is the only work over all T tokens: ``map_head.pool_tokens`` is its PyTorch reference,
:mod:`siglip_dola.readout.kernel` its Triton kernel (one read per layer). :class:`LayerPooler` pools each
layer as the forward produces it, so no (B, T, D) layer is kept; the per-vector part (the split merge with
W_v in one kernel, then the model's proj / norm + MLP) runs once for all layers at the end.

Where block j+1 starts with its own LayerNorm of block j's output (timm ``norm1``, HF ``layer_norm1``: pre-norm
ViTs), the fused path pools layer j from that norm's output instead (:class:`EntryNorm`): the model computes it
anyway, and n - beta = gamma * x_hat needs no statistics, so the kernel skips its reductions (timed in
benchmarks/README.md). Exact up to fp32 rounding; used only when the norm's eps equals the final norm's, its output is fp32, its
input is the very tensor block j returned, and gamma passes the precision guards of
:func:`~siglip_dola.readout.entry_norm.entry_norm`.

At small batches (B <= config ``stacked_max_batch``, or ``stacked_max_batch_graphed`` in a CUDA graph capture; CUDA)
per-layer launches are latency-bound: (B, <=8) programs
leave most SMs idle (benchmarks/README.md), and in eager each costs Python. There the block hooks
only hold the outputs (by reference) and :meth:`LayerPooler.result` pools all J layers in ONE stats-mode launch
over the stacked (J * B, T, D) tokens ("fused-stacked"); no entry-norm hooks run.

The path names, the log-once fall-back messages, the per-call capability check and the CUDA-graph mode are in
:mod:`siglip_dola.readout.call_state`; the pooler interface that picks a pooler per call is
:mod:`siglip_dola.readout.pooler`.
"""
from __future__ import annotations

import logging

import torch

from siglip_dola import config
from siglip_dola.readout.call_state import block_tokens, capturing, log_once, missing_error
from siglip_dola.readout.entry_norm import ENTRY_BLOCK_TYPES, EntryNorm, tensor_version
from siglip_dola.readout.kernel import merge_values, pool_partials, split_plan, triton_usable
from siglip_dola.readout.map_head import head_values, pool_tokens

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - depends on the environment
    OutOfResources = RuntimeError  # never raised without triton

_FITTING_STAGES: dict = {}   # LayerPooler._stage_key(...) (its last field: shifted) -> stages that fit (0: none)


class LayerPooler:
    """Pools each requested layer through the folded head as the forward produces it (Triton or PyTorch).

    Per layer j a hook on block j, and where ``entries`` holds an EntryNorm, one on block j+1's first norm
    (then block j's output is held, by reference, until that norm ran). The first pooled layer decides
    between the Triton kernel and PyTorch for the whole call; the first block output whether every layer is
    held and pooled in one stacked launch at :meth:`result` (small batches, see the module docstring). After
    :meth:`result`, ``paths`` maps each layer to one of :data:`PATHS` and ``reasons`` each layer to why it did
    not take the fastest, or None.
    """

    def __init__(self, folded, layers: list[int], entries=None, fused: bool = True, reason: str | None = None):
        # entries: {layer: (EntryNorm | None, why not)}, or a function layer -> that pair, called only for layers
        # pooled one by one (a stacked call needs none: preparing them is host time, benchmarks/README.md)
        self.folded, self.layers = folded, list(layers)
        self._slot = {layer: slot for slot, layer in enumerate(self.layers)}
        self._entries, self._reason = entries or {}, None if fused else (reason or "fused pooling not possible")
        self._entry_of: dict[int, tuple] = {}
        self.launch = config.pooling_launch()
        self._pooled: dict[int, torch.Tensor] = {}  # PyTorch path: slot -> (B, H, D)
        self._fast = None                           # decided on the first pooled layer
        self._stacked = None                        # decided on the first block output: one launch in result()
        self._out = self._lse = self._tokens_per_split = None
        self._launched = False                      # a fast launch succeeded in this call
        self._held: dict = {}                       # slot -> (block output, its _version) awaiting its norm
        self._done: set = set()
        self.paths: dict[int, str] = {}
        self.reasons: dict[int, str | None] = {}

    # ------------------------------------------------------------ the interface the readout drives
    def hooks(self, layer: int, blocks) -> list:
        """[(module, forward hook)] for ``layer``: its block, and block j+1's first norm on the entry path."""
        slot = self._slot[layer]
        entry = None if self._stacked else self._entry(layer)[0]

        def block_hook(module, args, output):
            if slot in self._done or slot in self._held:
                raise RuntimeError(f"block {layer} ran twice in one forward; the readout needs a single pass")
            tokens = block_tokens(output)                                   # (B, T, D)
            if self._stacked is None:
                self._stacked = self._stacks(tokens, module)
            self.hold(slot, tokens) if entry is not None or self._stacked else self.add(slot, tokens)

        def norm_hook(module, args, output):
            self.add_entry(slot, entry, args[0] if args else None, output)

        # the readout asks for later layers' hooks after the first block's hook ran: stacked, they need no norm hook
        norm = entry is not None and not self._stacked
        return [(blocks[layer - 1], block_hook)] + ([(entry.module, norm_hook)] if norm else [])

    def hold(self, slot: int, tokens: torch.Tensor) -> None:
        """Keep block j's output (a reference, no copy) until :meth:`add_entry` or :meth:`result` pools it."""
        self._held[slot] = (tokens, tensor_version(tokens))

    def result(self) -> torch.Tensor:
        """z_layers (J, B, D_out), in the order of ``layers``."""
        missing = [layer for layer in self.layers if self._slot[layer] not in self._done | self._held.keys()]
        if missing:
            raise missing_error(missing)
        if self._stacked:
            self._pool_stacked()
        for slot in sorted(self._held):            # held layers whose next norm never ran: pool the block output
            self.add(slot, self._take(slot), why_stats="its next norm never ran")
        folded = self.folded
        if self._fast:   # per layer: (J, B, H, S, D); stacked: (1, J * B, H, S, D)
            values = merge_values(self._out.flatten(0, 1), self._lse.flatten(0, 1), folded.value_weight,
                                  folded.value_bias)                                 # (J * B, H * hd)
        else:
            pooled = torch.stack([self._pooled[slot] for slot in range(len(self.layers))])   # (J, B, H, D), small
            values = head_values(pooled.flatten(0, 1), folded.value_weight, folded.value_bias)
        z_layers = folded.tail(values.to(folded.tail_dtype))                     # (J * B, D_out)
        num_slots = len(self.layers)
        return z_layers.reshape(num_slots, values.shape[0] // num_slots, z_layers.shape[-1])

    def _pool_stacked(self) -> None:
        """Every layer in ONE stats-mode launch over the held outputs stacked to (J * B, T, D); PyTorch per layer
        where the kernel fits nowhere. Shapes only, no host read: this runs inside a CUDA graph capture too."""
        held = [self._take(slot) for slot in range(len(self.layers))]    # raises for an output changed in place
        tokens = torch.stack(held).flatten(0, 1)                          # (J * B, T, D): one copy, for one launch
        self._start_fast(tokens, num_slots=1)
        if self._launch_fast(0, tokens, None):
            for slot in range(len(self.layers)):
                self._record(slot, "fused-stacked", None)
            return
        for slot, layer_tokens in enumerate(held):
            self._pooled[slot] = pool_tokens(layer_tokens, self.folded.key_probe, self.folded.norm_eps)  # (B, H, D)
            self._record(slot, "pytorch", self._reason)

    # ------------------------------------------------------------ internals
    def _decide(self, tokens: torch.Tensor, shifted: bool) -> None:
        reason = self._reason
        if reason is None and not triton_usable(tokens, self.folded.key_probe):
            reason = (f"{tokens.dtype} tokens without a half-precision autocast: the exact PyTorch path "
                      "(the kernel's products are fp16)")
            log_once(reason, logging.INFO)
        elif reason is None and _FITTING_STAGES.get(self._stage_key(tokens, shifted)) == 0:
            reason = "the pooling kernel does not fit this GPU's shared memory at any pipelining depth"
        elif reason is not None and tokens.is_cuda and "config" not in reason:
            log_once(f"PyTorch pooling on CUDA: {reason}")
        self._fast, self._reason = reason is None, reason
        if self._fast:
            self._start_fast(tokens, len(self.layers))

    def _stacks(self, tokens: torch.Tensor, block) -> bool:
        """Whether this call holds every layer and pools them in one launch at result() (decided once per call).

        Only where the per-layer kernel would run: fused possible, the Triton precision rule, a fitting launch.
        Without version counters (inference mode) only blocks known not to write their input (ENTRY_BLOCK_TYPES)
        may be held that long: the held output must still be what block j returned after the whole forward."""
        launch = self.launch
        limit = launch["stacked_max_batch_graphed" if capturing(tokens) else "stacked_max_batch"]
        stacks = (self._reason is None and 0 < tokens.shape[0] <= limit
                  and (tokens.is_cuda or launch["stacked_on_cpu"]) and triton_usable(tokens, self.folded.key_probe)
                  and (tensor_version(tokens) is not None or type(block).__name__ in ENTRY_BLOCK_TYPES)
                  and _FITTING_STAGES.get(self._stage_key(tokens, False)) != 0)
        if stacks:
            self._fast = True   # its buffers are made in _pool_stacked, for the stacked batch
        return stacks

    def _start_fast(self, tokens: torch.Tensor, num_slots: int) -> None:
        """The partial buffers (num_slots, B, H, S, D) and (num_slots, B, H, S) for tokens (B, T, D)."""
        batch, num_tokens, dim = tokens.shape
        heads = self.folded.key_probe.shape[0]
        make = lambda *shape: torch.empty(*shape, device=tokens.device, dtype=torch.float32)  # noqa: E731
        target = self.launch["target_programs"] or (   # one 8-warp program fills an SM (192 KiB of shared memory)
            torch.cuda.get_device_properties(tokens.device).multi_processor_count if tokens.is_cuda else 4)
        self._tokens_per_split, splits = split_plan(batch, num_tokens, target, self.launch["block_t"])
        self._out, self._lse = make(num_slots, batch, heads, splits, dim), make(num_slots, batch, heads, splits)

    def _entry(self, layer: int) -> tuple:
        """(EntryNorm | None, why not) for ``layer``, prepared on first use."""
        if layer not in self._entry_of:
            entries = self._entries
            self._entry_of[layer] = entries(layer) if callable(entries) else entries.get(
                layer, (None, "no entry norm was prepared for it"))
        return self._entry_of[layer]

    def _stage_key(self, tokens: torch.Tensor, shifted: bool) -> tuple:
        launch = self.launch
        return (tokens.device, tokens.dtype, tokens.shape[-1], launch["block_t"], launch["num_warps"],
                launch["num_stages"], shifted)

    def add(self, slot: int, tokens: torch.Tensor, why_stats: str | None = None) -> None:
        """Pool one layer (slot = position in ``layers``) from its raw block output tokens (B, T, D)."""
        layer = self.layers[slot]
        if self._fast is None:
            self._decide(tokens, shifted=False)
        if self._fast and self._launch_fast(slot, tokens, None):
            entry_reason = why_stats or self._entry(layer)[1]
            self._record(slot, "fused-stats", entry_reason or "its next block's norm was not usable")
            return
        self._pooled[slot] = pool_tokens(tokens, self.folded.key_probe, self.folded.norm_eps)   # (B, H, D)
        self._record(slot, "pytorch", self._reason)

    def add_entry(self, slot: int, entry: EntryNorm, norm_input, normed: torch.Tensor) -> None:
        """Pool a held slot from block j+1's first LayerNorm, called with its input and output (B, T, D)."""
        if self._stacked or slot not in self._held:
            return     # stacked: result() pools it (the first layer's norm hook exists); or this norm ran again
        tokens = self._take(slot)
        exact = norm_input is tokens and normed.dtype == torch.float32 and normed.shape == tokens.shape
        if exact and self._fast is None:
            self._decide(normed, shifted=True)
        if not exact:
            self.add(slot, tokens, why_stats="its next norm did not read the block output as it was, in fp32")
        elif not self._fast or not self._launch_fast(slot, normed, entry):
            self.add(slot, tokens)
        else:
            self._record(slot, "fused-entry-norm", None)

    def _take(self, slot: int) -> torch.Tensor:
        tokens, version = self._held.pop(slot)
        if tensor_version(tokens) != version:
            when, switch = ("before the readout pooled it after the forward", "stacked_max_batch=0") if self._stacked \
                else ("before its first norm", "entry_norms=False")
            raise RuntimeError(f"the block after layer {self.layers[slot]} modified that layer's output in place "
                               f"{when}; the fused readout cannot read it (use siglip_dola.config.override({switch}))")
        return tokens

    def _record(self, slot: int, path: str, reason: str | None) -> None:
        self._done.add(slot)
        self.paths[self.layers[slot]], self.reasons[self.layers[slot]] = path, reason

    def _launch_fast(self, slot: int, tokens: torch.Tensor, entry: EntryNorm | None) -> bool:
        """Launch the kernel for one slot; False when it fits nowhere and this call falls back to PyTorch."""
        try:
            self._launch(slot, tokens, entry)
        except OutOfResources:
            if self._launched:
                raise            # a later launch cannot fall back: earlier slots are in the fast buffers
            self._fast, self._reason = False, "the pooling kernel does not fit this GPU's shared memory"
            log_once(f"PyTorch pooling on CUDA: {self._reason}")
            return False
        self._launched = True
        return True

    def _launch(self, slot: int, tokens: torch.Tensor, entry: EntryNorm | None) -> None:
        key = self._stage_key(tokens, entry is not None)
        launch = self.launch
        stages = _FITTING_STAGES.get(key, launch["num_stages"])
        probe, eps = (self.folded.key_probe, self.folded.norm_eps) if entry is None else (entry.probe, None)
        shifted = {} if entry is None else dict(shift=entry.shift, scale=entry.scale)
        while True:   # fewer load stages where shared memory is short (an A100 allows 163 KiB per program)
            try:
                # any strides: timm's residual stream is stored (B, D, T) (strides (T*D, 1, T)); a copy would cost more
                pool_partials(tokens, probe, eps, self._out[slot], self._lse[slot], self._tokens_per_split,
                              launch["num_warps"], launch["block_t"], stages, **shifted)
                _FITTING_STAGES[key] = stages
                return
            except OutOfResources:
                if stages <= 1:
                    _FITTING_STAGES[key] = 0   # fits nowhere here: later calls go straight to PyTorch
                    raise
                stages -= 1
