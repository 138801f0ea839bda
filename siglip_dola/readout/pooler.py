"""Layer pooling behind ONE interface: the readout's core asks a pooler for hooks, runs the forward, takes result().

:meth:`Pooling.begin` picks the pooler of one call: :class:`~siglip_dola.readout.layer_pooler.LayerPooler` for a
folded MAP head (the Triton kernel or PyTorch, layer_pooler.py), :class:`~siglip_dola.readout.token_head.HeadPooler`
for a tower's own :class:`~siglip_dola.readout.token_head.LayerHead` (class token, pooled, masked MAP), or
:class:`OwnHeadPooler` (every layer through the model's own head modules, when the head is not folded).

Each call records the path each layer took (:data:`PATHS`) and why it is not the fastest; the readout exposes
them as ``layer_paths`` / ``path_reasons``. A fall-back to PyTorch on CUDA is logged once per reason.
"""
from __future__ import annotations

import torch

from siglip_dola import config
from siglip_dola.readout.call_state import (PATHS, block_tokens, fused_possible, log_once, missing_error,
                                            stream_capturing)
from siglip_dola.readout.entry_norm import EntryNorm, entry_norm, first_norm, tensor_version
from siglip_dola.readout.kernel import combine_partials
from siglip_dola.readout.layer_pooler import LayerPooler
from siglip_dola.readout.token_head import HeadPooler, LayerHead


class Pooling:
    """A readout's pooling state across calls (the EntryNorm cache); :meth:`begin` -> the pooler of one call."""

    def __init__(self, blocks, own_embedding):
        self._blocks, self._own_embedding = blocks, own_embedding
        self._entries: dict = {}   # layer -> (head, norm weights key, EntryNorm | None, reason)

    def begin(self, head, layers: list[int], device: torch.device, inputs: dict | None = None):
        """The pooler for one call: hooks(layer) -> [(module, forward hook)], then result() -> (J, B, D_out).

        ``inputs``: the call's extra model inputs (SigLIP2 NaFlex's mask), for a tower's own
        :class:`~siglip_dola.readout.token_head.LayerHead` (class token, pooled, masked MAP), pooled in PyTorch."""
        if head is None:
            return OwnHeadPooler(self._own_embedding, layers)
        if isinstance(head, LayerHead):
            return HeadPooler(head, layers, inputs or {})
        fused, reason = fused_possible(head, torch.device(device))
        if not fused:
            entries = {}
        elif config.use_entry_norms():
            # prepared per layer on first use; inside a CUDA graph capture only from the cache (preparing reads the
            # host), else a layer without one is pooled from statistics: warm-ups (graph_mode) fill the cache
            capture = stream_capturing(torch.device(device))
            entries = lambda layer: self.entry(layer, head, cached_only=capture)   # noqa: E731
        else:
            entries = {layer: (None, "entry norms are off (siglip_dola.config entry_norms=False)") for layer in layers}
        return LayerPooler(head, layers, entries, fused, reason)

    def entry(self, layer: int, head, cached_only: bool = False) -> tuple[EntryNorm | None, str | None]:
        """Block layer+1's first LayerNorm prepared for the fused path (cached per head and weights), and why not;
        cached_only: (None, why) where it is not cached (preparing it reads values on the host)."""
        if layer >= len(self._blocks):
            return None, "no block follows it"
        block = self._blocks[layer]                                          # block j+1 (0-based index j)
        norm = first_norm(block)
        # a cheap key (this runs per layer per call, before the first kernel): the weights' storage and version
        key = None if norm is None else tuple((p.data_ptr(), tensor_version(p), p.dtype) for p in norm.parameters())
        cached = self._entries.get(layer)
        if cached is None or cached[0] is not head or cached[1] != key:
            if cached_only:
                return None, "its entry norm was not prepared before this CUDA graph capture (no warm-up call)"
            cached = (head, key, *entry_norm(block, head))
            self._entries[layer] = cached
        return cached[2], cached[3]


class OwnHeadPooler:
    """Every layer through the model's own final norm + head, right in its block's hook (no folded head)."""

    def __init__(self, own_embedding, layers: list[int]):
        self._own_embedding, self.layers = own_embedding, layers
        self._z: dict[int, torch.Tensor] = {}
        self.paths = {layer: "model-head" for layer in layers}
        self.reasons = {layer: "the head is not folded (see Readout.fallback_reason)" for layer in layers}

    def hooks(self, layer: int, blocks) -> list:
        def hook(module, args, output):
            if layer in self._z:
                raise RuntimeError(f"block {layer} ran twice in one forward; the readout needs a single pass")
            self._z[layer] = self._own_embedding(block_tokens(output))   # (B, D_out)
        return [(blocks[layer - 1], hook)]

    def result(self) -> torch.Tensor:
        missing = [layer for layer in self.layers if layer not in self._z]
        if missing:
            raise missing_error(missing)
        return torch.stack([self._z[layer] for layer in self.layers])    # (J, B, D_out)


__all__ = ["PATHS", "EntryNorm", "LayerPooler", "OwnHeadPooler", "Pooling", "combine_partials", "entry_norm",
           "first_norm", "log_once", "tensor_version"]
