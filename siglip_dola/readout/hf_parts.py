"""The parts every Hugging Face tower builder reads (SigLIP, CLIP, SigLIP2): the vision transformer inside a full
or vision model, its config, its input channels and the model's own image embedding.

HF nests the vision transformer (embeddings, encoder.layers, post_layernorm) at ``model`` itself (5.x vision
models), ``model.vision_model`` (4.x vision models, any full model) or ``model.vision_model.vision_model``
(5.x full models); each builder adds what tells its family apart (a MAP head, pre_layrnorm, NaFlex embeddings).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn


def is_vision_transformer(module) -> bool:
    """True for a module with embeddings, encoder.layers (a ModuleList) and post_layernorm: HF's vision layout."""
    encoder = getattr(module, "encoder", None)
    return (isinstance(module, nn.Module) and hasattr(module, "embeddings")
            and isinstance(getattr(encoder, "layers", None), nn.ModuleList)
            and isinstance(getattr(module, "post_layernorm", None), nn.Module))


def find_vision(model, accepts: Callable[[nn.Module], bool]):
    """The vision transformer that ``accepts`` at model, .vision_model or .vision_model.vision_model, or None:
    not a HF model (no ``config``), no such module, or fewer than 2 blocks (no intermediate layer to read)."""
    if not hasattr(model, "config"):
        return None
    candidate = model
    for _ in range(3):
        if is_vision_transformer(candidate) and accepts(candidate):
            return candidate if len(candidate.encoder.layers) >= 2 else None
        candidate = getattr(candidate, "vision_model", None)
        if candidate is None:
            return None
    return None


def vision_config(model, vision):
    """The vision config: the vision model's own, else the full model's vision_config, else the model's config."""
    return getattr(vision, "config", None) or getattr(model.config, "vision_config", model.config)


def in_channels(vision, config) -> int:
    """Image channels: the patch conv's in_channels, else config.num_channels, else 3."""
    patch_conv = getattr(vision.embeddings, "patch_embedding", None)
    return int(getattr(patch_conv, "in_channels", getattr(config, "num_channels", 3)))


def as_embedding(output) -> torch.Tensor:
    """get_image_features / forward output -> (B, D): 4.x returns a tensor, 5.x (and vision models) an output object."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise RuntimeError(f"HF model returned {type(output).__name__} without pooler_output")
    return pooled


def embed_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> the model's own embedding (B, D): get_image_features of a full model, else forward."""
    if hasattr(model, "get_image_features"):
        return lambda images: as_embedding(model.get_image_features(pixel_values=images))
    return lambda images: as_embedding(model(pixel_values=images))
