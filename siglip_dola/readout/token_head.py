"""Layer heads for towers whose head is not a plain MAP head: class token (CLIP), the model's own pooling
(average, CoCa attention pool), and SigLIP2 NaFlex's MAP head over a padding mask.

A LayerHead reads layer j in two steps, so that the hooks keep one small tensor per layer and the
per-vector part runs once for all layers, batched:

    select(tokens (B, T, D), **inputs) -> pooled (B, P)      in block j's hook, during the forward
    finish(pooled (J, B, P)) -> z (J, B, D_out)              once, after the forward

Class token (open_clip ``pool_type='tok'``, HF CLIP): LayerNorm acts on each token alone, so
``ln_post(x)[:, 0] == ln_post(x[:, 0])``: select is one token per image (no pooling kernel, nothing over
T), and ln_post + proj run in finish on (J, B, D). Other forms call the model's own pooling in select
(``VisionTransformer._pool``: its own pool_type / final_ln_after_pool / attn_pool logic), proj in finish.
The masked MAP head folds like SigLIP's (map_head.py); padding patches get zero attention weight, as
the model's own additive mask (finfo.min) gives them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from siglip_dola.readout.map_head import FoldedMapHead


@dataclass(frozen=True)
class LayerHead:
    """How a tower reads layer j: ``select`` in the hook, ``finish`` batched over layers (see module doc)."""

    select: Callable[..., torch.Tensor]        # (B, T, D), **inputs -> (B, P)
    finish: Callable[[torch.Tensor], torch.Tensor]   # (J, B, P) -> (J, B, D_out)
    path: str                                  # "token" | "pooled" | "masked_map" | "model": for head_path

    def __call__(self, tokens: torch.Tensor, **inputs) -> torch.Tensor:
        """Raw block output (B, T, D) -> embedding (B, D_out), one layer."""
        return self.finish(self.select(tokens, **inputs)[None])[0]



class HeadPooler:
    """One call's pooler for a LayerHead, with pooler.Pooling's interface: ``hooks(layer, blocks)`` ->
    [(block j, hook)] (select in the hook), then ``result()`` -> (J, B, D_out) (finish, batched)."""

    def __init__(self, head: LayerHead, layers: list[int], inputs: dict):
        self.head, self.layers, self.inputs = head, list(layers), inputs
        self._parts: dict[int, torch.Tensor] = {}
        path = "model-head" if head.path == "model" else "pytorch"
        self.paths = {layer: path for layer in self.layers}
        self.reasons = {layer: f"{head.path} layer head (token_head.py): PyTorch, no fused kernel"
                        for layer in self.layers}

    def hooks(self, layer: int, blocks) -> list:
        def hook(module, args, output):
            if layer in self._parts:
                raise RuntimeError(f"block {layer} ran twice in one forward; the readout needs a single pass")
            tokens = output[0] if isinstance(output, (tuple, list)) else output   # (B, T, D)
            self._parts[layer] = self.head.select(tokens, **self.inputs)        # (B, P)
        return [(blocks[layer - 1], hook)]

    def result(self) -> torch.Tensor:
        missing = [layer for layer in self.layers if layer not in self._parts]
        if missing:
            raise RuntimeError(f"blocks {missing} never ran during the forward (a compiled or scripted model "
                               "does not call hooks); pass the eager model")
        return self.head.finish(torch.stack([self._parts[layer] for layer in self.layers]))   # (J, B, D_out)


def class_token_head(norm: nn.Module, project: Callable[[torch.Tensor], torch.Tensor], index: int = 0) -> LayerHead:
    """Token ``index`` -> norm -> project (open_clip pool_type='tok', HF CLIP)."""
    return LayerHead(select=lambda tokens, **_: tokens[:, index],
                     finish=lambda pooled: project(norm(pooled)), path="token")


def pooled_head(pool: Callable[[torch.Tensor], torch.Tensor],
                project: Callable[[torch.Tensor], torch.Tensor]) -> LayerHead:
    """The model's own ``pool`` (B, T, D) -> (B, P) per layer, then ``project`` batched."""
    return LayerHead(select=lambda tokens, **_: pool(tokens), finish=project, path="pooled")


def masked_map_head(folded: FoldedMapHead, mask_name: str) -> LayerHead:
    """A folded MAP head whose pooling skips the padding patches named by the ``mask_name`` input (B, T)."""
    def select(tokens: torch.Tensor, **inputs) -> torch.Tensor:
        return folded.pool(tokens, mask=inputs.get(mask_name))               # (B, D)

    def finish(values: torch.Tensor) -> torch.Tensor:
        layers, batch = values.shape[:2]
        z = folded.tail(values.flatten(0, 1).to(folded.tail_dtype))          # (J*B, D_out): one tail call
        return z.reshape(layers, batch, -1)

    return LayerHead(select=select, finish=finish, path="masked_map")


def own_masked_head(norm: nn.Module, head: nn.Module, mask_name: str) -> LayerHead:
    """The model's own norm + head(tokens, mask) on every layer (no folding)."""
    return LayerHead(select=lambda tokens, **inputs: head(norm(tokens), inputs.get(mask_name)),
                     finish=lambda pooled: pooled, path="model")


def own_head(embed_layer: Callable[[torch.Tensor], torch.Tensor]) -> LayerHead:
    """The model's own norm + pooling + projection, ``embed_layer`` (B, T, D) -> (B, D_out), on every layer."""
    return LayerHead(select=lambda tokens, **_: embed_layer(tokens), finish=lambda pooled: pooled, path="model")
