"""The Readout: z_final and z_j = head(norm(h_j)) for requested layers j, from ONE backbone forward.

How: per call, a pooler (``pooler.Pooling.begin``: the folded head in Triton or PyTorch, or the model's own
head) names the forward hooks it needs; the core registers them for the duration of one call of the
model's own embedding function and removes them in ``finally``, then takes ``pooler.result()``. Each layer
is pooled as the forward produces it, so only (B, D)-sized results are kept, never the (B, T, D) token
tensors. z_final is what the model's own forward returns. The model is never written: no weights, flags or lasting hooks;
the folded head (and each EntryNorm) is a cache derived from the weights and rebuilt when their
storage, version, dtype, device or the head's train/eval flags change.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola import config
from siglip_dola.layers import LayerSelection, checked_layers
from siglip_dola.readout.entry_norm import first_norm
from siglip_dola.readout.call_state import log_once
from siglip_dola.readout.pooler import Pooling
from siglip_dola.readout.map_head import FoldedMapHead, fold
from siglip_dola.readout.stacking_tuner import stacked_limit
from siglip_dola.readout.towers import Tower

_PROBE_SHAPE = (2, 7)          # (B, T) of the random tokens that check the folded head against the model's
_CHECK_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_HALF_TOL = 5e-2


def _fingerprint(submodules: tuple[nn.Module, ...]) -> tuple:
    """Every direct parameter of the given (already flattened) modules (storage, version, dtype, device,
    shape), their train/eval flags and their children: a parameter or submodule replaced, or a weight written
    in place, changes it."""
    weights = tuple((p.data_ptr(), p._version, p.dtype, p.device, p.shape)
                    for module in submodules for p in module._parameters.values() if p is not None)
    children = tuple(id(child) for module in submodules for child in module._modules.values())
    return weights + children + tuple(module.training for module in submodules)


def _flatten(modules: tuple[nn.Module, ...]) -> tuple[nn.Module, ...]:
    return tuple(m for module in modules for m in module.modules())


def _first_norm_params(block: nn.Module) -> tuple:
    norm = first_norm(block)
    return () if norm is None else tuple(norm.parameters())


def _head_param(modules: tuple[nn.Module, ...]) -> torch.Tensor | None:
    return next((p for module in modules for p in module.parameters()), None)


class Readout:
    """``readout(images, layers)`` -> (z_final (B, D), z_layers (J, B, D)) raw embeddings, one forward pass.

    Attributes: ``num_layers`` (N), ``embed_dim`` (D), ``image_size`` (H, W), ``backend`` ("timm" | "hf" | "open_clip"),
    ``head_path`` ("folded": exact folded MAP head for layers 1..N-1 | "model": the model's own head |
    "token": class token, then the model's final norm and projection | "pooled": the model's own pooling,
    then its projection | "masked_map": folded MAP head over a padding mask; token_head.py),
    ``fallback_reason`` (why the folded head is not used, else None), ``packed_inputs`` (True: the model takes
    packed NaFlex patches (B, 1 + P, C*p*p), tower_hf_siglip2.pack, instead of (B, C, H, W) images), and from
    the last call ``layer_paths`` ({layer: "fused-entry-norm" | "fused-stats" | "fused-stacked" | "pytorch" |
    "model-head"}) and ``path_reasons`` ({layer: why not the fastest path, or None}).
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
        # the head's modules, flattened once: walking module.modules() and parameters() every call is host time
        # (eager batch 1 is host-bound, benchmarks/README.md); their parameters are still read every call
        self._head_submodules = _flatten(tower.head_modules)
        self._folded: FoldedMapHead | None = None
        self._pooling = Pooling(tower.blocks, self._own_layer_embedding)
        self._derived_params = tuple(p for module in (*tower.head_modules, *tower.blocks) for p in (
            module.parameters() if module in tower.head_modules else _first_norm_params(module)))
        self.fallback_reason: str | None = None
        self.layer_paths: dict[int, str] = {}          # the last call's path per layer (pooler.PATHS)
        self.path_reasons: dict[int, str | None] = {}  # why a layer did not take the fastest path, else None
        with torch.no_grad():
            self.embed_dim = int(self._own_layer_embedding(self._probe_tokens()).shape[-1])
            self._current_head()

    def __repr__(self) -> str:
        return (f"Readout(backend={self.backend!r}, num_layers={self.num_layers}, embed_dim={self.embed_dim}, "
                f"image_size={self.image_size}, head_path={self.head_path!r})")

    def derived_key(self) -> tuple:
        """A cheap key of the weights the readout derives tensors from (head, final norm, each block's first
        norm): storage and in-place version. A CUDA graph replays the derived tensors of its capture, so a
        graph cache keys on this and captures again after weights change, in place or not."""
        return tuple((p.data_ptr(), p._version) for p in self._derived_params)

    @property
    def head_path(self) -> str:
        """How layers 1..N-1 are read: "folded" (folded MAP head), a token_head path ("token", "pooled",
        "masked_map"), or "model" (the model's own norm + head per layer)."""
        return getattr(self._folded, "path", "folded") if self._folded is not None else "model"

    def __call__(self, images: torch.Tensor, layers=None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W), layers 1..N-1 -> z_final (B, D), z_layers (J, B, D) in the order of ``layers``.

        ``inputs``: the tower's extra keyword inputs (SigLIP2 NaFlex: pixel_attention_mask, spatial_shapes).
        """
        layer_list = self.check_layers(layers)
        images, inputs = self.prepare_inputs(images, inputs)
        limit = stacked_limit(images, layer_list, (self.backend, self.num_layers, self.embed_dim, self.head_path),
                              lambda limit: self._run(images, layer_list, inputs))
        if limit is None:
            return self._run(images, layer_list, inputs)
        with config.override(stacked_max_batch=limit):   # the pooling measured faster on this GPU at this batch
            return self._run(images, layer_list, inputs)

    def _run(self, images: torch.Tensor, layer_list: LayerSelection, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(layer_list, LayerSelection) and layer_list.num_layers == self.num_layers, layer_list
        if not layer_list:   # the final embedding alone: no pooler, so no head fingerprint before the first kernel
            with torch.no_grad():
                z_final = self._tower.embed(images, **inputs) if inputs else self._tower.embed(images)
            return z_final, z_final.new_empty((0, *z_final.shape))
        with torch.no_grad():
            pooler = self._pooling.begin(self._current_head(), layer_list, images.device, inputs)
            blocks, handles = self._tower.blocks, []

            def attach(layers) -> None:
                for layer in layers:
                    handles.extend(module.register_forward_hook(hook) for module, hook in pooler.hooks(layer, blocks))
            try:
                # the earliest block's hooks now, the rest from its hook: that CPU work then overlaps the forward
                # (the eager set-up's cost: benchmarks/README.md)
                first = min(layer_list)
                rest = [layer for layer in layer_list if layer != first]
                attached = []
                def attach_rest(module, args, output):   # noqa: E306
                    if not attached:
                        attached.append(True)
                        attach(rest)
                attach([first])   # before attach_rest: the pooler sees block `first`'s output (its path) first
                handles.append(blocks[first - 1].register_forward_hook(attach_rest))
                z_final = self._tower.embed(images, **inputs) if inputs else self._tower.embed(images)
            finally:
                for handle in handles:
                    handle.remove()
            z_layers = pooler.result().to(z_final.dtype)                     # (J, B, D)
        self.layer_paths, self.path_reasons = dict(pooler.paths), dict(pooler.reasons)
        return z_final, z_layers

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
        fingerprint = _fingerprint(self._head_submodules)
        if fingerprint != self._fingerprint:
            self._head_submodules = _flatten(self._tower.head_modules)   # a submodule may have been replaced
            fingerprint = _fingerprint(self._head_submodules)
            param = _head_param(self._tower.head_modules)
            device_type = "cpu" if param is None else param.device.type
            # autocast off: a rebuild can happen inside the caller's bf16 autocast (weights changed in place
            # after the first call); the probes must be folded in fp32 to pass the exactness check
            with torch.autocast(device_type=device_type, enabled=False):
                self._folded, self.fallback_reason = self._build_folded()
            self._fingerprint = fingerprint
            if self.fallback_reason is not None and device_type == "cuda":
                log_once(f"the model's own head for every layer: {self.fallback_reason}")
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
        expected, got = self._own_layer_embedding(probe).float(), folded(probe).float()
        error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        if not error <= _CHECK_TOL.get(probe.dtype, _HALF_TOL):
            reason = f"folded head differs from the model's own head (relative error {error:.2e})"
            own = self._tower.layer_head(False) if self._tower.layer_head is not None else None
            return (own if own is not None and own.path == "model" else None), reason
        return folded, None

    def check_layers(self, layers) -> LayerSelection:
        """``layers`` (None, [] or layer numbers 1..N-1) -> a LayerSelection for this model, by the one rule
        (layers.checked_layers; TypeError/ValueError naming the valid ones). One already made for this depth (resolved
        settings' layers) is taken as it is: the check ran where it was made."""
        return checked_layers(() if layers is None else layers, self.num_layers, empty_ok=True)

    def prepare_inputs(self, images, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The checked (images, extra inputs) for the tower's embed and pooler (NaFlex: unpacked); TypeError/
        ValueError for inputs this model does not take."""
        expected = self._tower.extra_inputs
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise TypeError(f"unexpected keyword inputs {unknown}; this model takes "
                            + (f"{list(expected)}" if expected else "images only"))
        if self._tower.prepare_inputs is not None:
            return self._tower.prepare_inputs(images, **inputs)
        self.check_images(images)
        return images, inputs

    def check_images(self, images) -> None:
        """Raise TypeError/ValueError unless images is a floating-point (B, C, H, W) tensor this model accepts."""
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
