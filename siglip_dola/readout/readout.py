"""The Readout: z_final and z_j = head(norm(h_j)) for requested layers j, from ONE backbone forward.

How: forward hooks on the requested blocks, registered for the duration of one call of the model's
own embedding function and removed in ``finally``. Each hook turns block j's output into z_j right
away (folded MAP head, or the model's own norm + head), so only (B, D) vectors are kept, never the
(B, T, D) token tensors. On the fused CUDA path a second hook on block j+1's first LayerNorm pools
layer j from that norm's output instead (``fused.EntryNorm``: no statistics to compute). z_final is
what the model's own forward returns. The model is never written: no weights, flags or lasting hooks;
the folded head (and each EntryNorm) is a cache derived from the weights and rebuilt when their
storage, version, dtype, device or the head's train/eval flags change.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.layers import resolve_layers
from siglip_dola.readout import pooler as fused
from siglip_dola.readout.map_head import FoldedMapHead, fold
from siglip_dola.readout.token_head import LayerHead
from siglip_dola.readout.towers import Tower, block_tokens

_PROBE_SHAPE = (2, 7)          # (B, T) of the random tokens that check the folded head against the model's
_CHECK_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_HALF_TOL = 5e-2


def _fingerprint(modules: tuple[nn.Module, ...]) -> tuple:
    weights = tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                    for module in modules for p in module.parameters())
    return weights + tuple(m.training for module in modules for m in module.modules())


def _entry_hook(pooler, slot: int, entry):
    def hook(module, args, output):
        pooler.add_entry(slot, entry, args[0] if args else None, output)
    return hook


def _head_param(modules: tuple[nn.Module, ...]) -> torch.Tensor | None:
    return next((p for module in modules for p in module.parameters()), None)


class Readout:
    """``readout(images, layers)`` -> (z_final (B, D), z_layers (J, B, D)) raw embeddings, one forward pass.

    Attributes: ``num_layers`` (N), ``embed_dim`` (D), ``image_size`` (H, W), ``backend`` ("timm" | "hf" | "open_clip"),
    ``head_path`` ("folded": exact folded MAP head for layers 1..N-1 | "model": the model's own head |
    "token": class token, then the model's final norm and projection | "pooled": the model's own pooling,
    then its projection | "masked_map": folded MAP head over a padding mask; token_head.py),
    ``fallback_reason`` (why the folded head is not used, else None), ``packed_inputs`` (True: the model takes
    packed NaFlex patches (B, 1 + P, C*p*p), tower_hf_siglip2.pack, instead of (B, C, H, W) images).
    """

    def __init__(self, tower: Tower, folded_head: bool = True):
        if not isinstance(folded_head, bool):
            raise TypeError(f"folded_head must be True or False, got {folded_head!r}")
        self._tower = tower
        self._use_folded = folded_head
        self.backend = tower.backend
        self.num_layers = len(tower.blocks)
        self.image_size = tuple(tower.image_size)
        self.packed_inputs = tower.prepare_inputs is not None   # NaFlex: one packed patch tensor per image
        self._fingerprint = None
        self._folded: FoldedMapHead | None = None
        self._entry_cache: dict = {}   # layer -> (head, norm fingerprint, EntryNorm | None)
        self.fallback_reason: str | None = None
        with torch.no_grad():
            self.embed_dim = int(self._own_layer_embedding(self._probe_tokens()).shape[-1])
            self._current_head()

    def __repr__(self) -> str:
        return (f"Readout(backend={self.backend!r}, num_layers={self.num_layers}, embed_dim={self.embed_dim}, "
                f"image_size={self.image_size}, head_path={self.head_path!r})")

    @property
    def head_path(self) -> str:
        """How layers 1..N-1 are read: "folded" (folded MAP head), a token_head path ("token", "pooled",
        "masked_map"), or "model" (the model's own norm + head per layer)."""
        return getattr(self._folded, "path", "folded") if self._folded is not None else "model"

    def __call__(self, images: torch.Tensor, layers=None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W), layers 1..N-1 -> z_final (B, D), z_layers (J, B, D) in the order of ``layers``.

        ``inputs``: the tower's extra keyword inputs (SigLIP2 NaFlex: pixel_attention_mask, spatial_shapes).
        """
        layer_list = self._check_layers(layers)
        images, inputs = self._prepare_inputs(images, inputs)
        with torch.no_grad():
            head = self._current_head()
            pooler = self._pooler(head, images.device, len(layer_list), inputs)
            captured: dict[int, torch.Tensor] = {}
            handles = []

            def register(layers, then=None):
                self._register(layers, layer_list, head, captured, pooler, handles, then)
            try:
                if layer_list:   # the earliest block's hooks now, the rest from its hook: that CPU work then
                    first = min(layer_list)   # overlaps the forward (eager set-up, 23 layers: 0.8 ms; run 27)
                    register([first], then=lambda: register([layer for layer in layer_list if layer != first]))
                z_final = self._tower.embed(images, **inputs) if inputs else self._tower.embed(images)
            finally:
                for handle in handles:
                    handle.remove()
            if pooler is not None and all(layer in captured for layer in layer_list):
                captured.update(zip(layer_list, pooler.result()))
        return z_final, self._stack(z_final, layer_list, captured)

    @staticmethod
    def _pooler(head, device: torch.device, count: int, inputs: dict):
        """The tower's own layer pooler (token_head.LayerHead, any device), else the fused MAP fast path or None."""
        if isinstance(head, LayerHead):
            return head.pooler(count, inputs) if count else None
        return fused.pooler_for(head, device, count)   # CUDA + Triton fast path, else None

    def _register(self, layers, layer_list, head, captured: dict, pooler, handles: list, then=None) -> None:
        """Forward hooks for ``layers`` (slot = position in layer_list) into ``handles``; ``then`` runs in their first call."""
        for layer in layers:
            slot = layer_list.index(layer)
            entry = self._entry_norm(layer, head) if pooler is not None and pooler.config.entry_norms else None
            hook = self._capture_hook(layer, head, captured, pooler, slot, hold=entry is not None, then=then)
            handles.append(self._tower.blocks[layer - 1].register_forward_hook(hook))
            if entry is not None:   # layer j pooled from block j+1's own first norm (fused.EntryNorm)
                handles.append(entry.module.register_forward_hook(_entry_hook(pooler, slot, entry)))

    def _capture_hook(self, layer: int, head: FoldedMapHead | None, captured: dict, pooler=None, slot: int = 0,
                      hold: bool = False, then=None):
        def hook(module, args, output):
            if layer in captured:
                raise RuntimeError(f"block {layer} ran twice in one forward; the readout needs a single pass")
            if then is not None:
                then()                                                       # the later layers' hooks
            tokens = block_tokens(output)                                    # (B, T, D)
            if pooler is not None:   # fused path: pooled now (or at the next norm) by the Triton kernel
                pooler.hold(slot, tokens) if hold else pooler.add(slot, tokens)
                captured[layer] = None
                return
            captured[layer] = head(tokens) if head is not None else self._own_layer_embedding(tokens)
        return hook

    def _entry_norm(self, layer: int, head: FoldedMapHead) -> fused.EntryNorm | None:
        """Block layer+1's first LayerNorm, prepared for the fused path (cached per head and weights), or None."""
        block = self._tower.blocks[layer]                                    # block j+1 (0-based index j)
        norm = fused.first_norm(block)
        # a cheap key (this runs per layer per call, before the first kernel): the weights' storage and version
        key = None if norm is None else tuple((p.data_ptr(), fused.tensor_version(p), p.dtype) for p in norm.parameters())
        cached = self._entry_cache.get(layer)
        if cached is None or cached[0] is not head or cached[1] != key:
            cached = (head, key, fused.entry_norm(block, head) if norm is not None else None)
            self._entry_cache[layer] = cached
        return cached[2]

    def _stack(self, z_final: torch.Tensor, layers: list[int], captured: dict) -> torch.Tensor:
        missing = [layer for layer in layers if layer not in captured]
        if missing:
            raise RuntimeError(f"blocks {missing} never ran during the forward (a compiled or scripted model "
                               "does not call hooks); pass the eager model")
        if not layers:
            return z_final.new_empty((0, *z_final.shape))
        return torch.stack([captured[layer].to(z_final.dtype) for layer in layers])   # (J, B, D)

    def _own_layer_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Block output (B, T, D) -> (B, D) through the model's own final norm and head."""
        return self._tower.own_head(self._tower.final_norm(tokens))

    def _probe_tokens(self) -> torch.Tensor:
        param = _head_param(self._tower.head_modules)
        generator = torch.Generator().manual_seed(0)   # private: the global RNG is left alone
        tokens = torch.randn(*_PROBE_SHAPE, self._tower.token_dim, generator=generator)
        return tokens if param is None else tokens.to(device=param.device, dtype=param.dtype)

    def _current_head(self) -> FoldedMapHead | None:
        """The folded head for the model's current weights (rebuilt when they changed), or None."""
        fingerprint = _fingerprint(self._tower.head_modules)
        if fingerprint != self._fingerprint:
            self._folded, self.fallback_reason = self._build_folded()
            self._fingerprint = fingerprint
        return self._folded

    def _build_folded(self) -> tuple[FoldedMapHead | None, str | None]:
        if self._tower.layer_head is not None:   # the tower says how to read a layer (token_head.py)
            folded = self._tower.layer_head(self._use_folded)
            if folded.path == "model":
                return folded, None if self._use_folded else "folded_head=False"
        elif not self._use_folded:
            return None, "folded_head=False"
        else:
            parts = self._tower.map_parts()
            if parts is None:
                return None, "the head is not a single-query MAP head of the plain form"
            folded = fold(parts, self._tower.final_norm)
            if folded is None:
                return None, f"final norm {type(self._tower.final_norm).__name__} is not LayerNorm/Identity"
        probe = self._probe_tokens()
        with torch.autocast(device_type=probe.device.type, enabled=False):
            expected, got = self._own_layer_embedding(probe).float(), folded(probe).float()
        error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        if not error <= _CHECK_TOL.get(probe.dtype, _HALF_TOL):
            reason = f"folded head differs from the model's own head (relative error {error:.2e})"
            own = self._tower.layer_head(False) if self._tower.layer_head is not None else None
            return (own if own is not None and own.path == "model" else None), reason
        return folded, None

    def _check_layers(self, layers) -> list[int]:
        if layers is None or (hasattr(layers, "__len__") and not isinstance(layers, (str, bytes)) and len(layers) == 0):
            return []   # just the final embedding (the baseline)
        try:
            return resolve_layers(self.num_layers, layers=layers)
        except TypeError as error:
            raise TypeError(f"{error}; valid layers are ints in 1..{self.num_layers - 1}") from None

    def _prepare_inputs(self, images, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The checked (images, extra inputs) for the tower's embed and pooler (NaFlex: unpacked)."""
        expected = self._tower.extra_inputs
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise TypeError(f"unexpected keyword inputs {unknown}; this model takes "
                            + (f"{list(expected)}" if expected else "images only"))
        if self._tower.prepare_inputs is not None:
            return self._tower.prepare_inputs(images, **inputs)
        self._check_images(images)
        return images, inputs

    def _check_images(self, images) -> None:
        channels, (height, width) = self._tower.in_chans, self.image_size
        expected = f"[B, {channels}, H, W]" if self._tower.dynamic_size else f"[B, {channels}, {height}, {width}]"
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating-point torch.Tensor {expected}, got {type(images).__name__}"
                            + (f" of dtype {images.dtype}" if isinstance(images, torch.Tensor) else ""))
        shape_ok = images.dim() == 4 and images.shape[1] == channels
        if shape_ok and not self._tower.dynamic_size:
            shape_ok = tuple(images.shape[-2:]) == (height, width)
        if not shape_ok:
            raise ValueError(f"images must have shape {expected} for this model, got {tuple(images.shape)}")
