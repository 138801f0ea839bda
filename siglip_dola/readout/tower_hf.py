"""Hugging Face transformers SigLIP: ``SiglipModel`` / ``SiglipVisionModel`` (4.x and 5.x layouts).

The vision transformer (embeddings, encoder.layers, post_layernorm, head) sits at ``model`` itself
(5.x SiglipVisionModel), ``model.vision_model`` (4.x SiglipVisionModel, any SiglipModel) or
``model.vision_model.vision_model`` (5.x SiglipModel). ``hidden_states[j]`` is block j's output;
the embedding is ``head(post_layernorm(h_N))`` = ``get_image_features`` / ``pooler_output``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.readout.map_head import hf_map_parts
from siglip_dola.readout.towers import Tower, two_tuple


def _is_vision_transformer(module) -> bool:
    encoder = getattr(module, "encoder", None)
    return (isinstance(module, nn.Module) and hasattr(module, "embeddings")
            and isinstance(getattr(encoder, "layers", None), nn.ModuleList)
            and isinstance(getattr(module, "post_layernorm", None), nn.Module)
            and isinstance(getattr(module, "head", None), nn.Module))


def _find_vision_transformer(model):
    candidate = model
    for _ in range(3):
        if _is_vision_transformer(candidate):
            return candidate
        candidate = getattr(candidate, "vision_model", None)
        if candidate is None:
            return None
    return None


def _as_embedding(output) -> torch.Tensor:
    """get_image_features / forward output -> (B, D): 4.x returns a tensor, 5.x (and vision models) an output object."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise RuntimeError(f"HF model returned {type(output).__name__} without pooler_output")
    return pooled


def _embed_fn(model):
    if hasattr(model, "get_image_features"):
        return lambda images: _as_embedding(model.get_image_features(pixel_values=images))
    return lambda images: _as_embedding(model(pixel_values=images))


def build(model) -> Tower | None:
    """A Tower for a HF SigLIP vision model with a pooling head, or None when ``model`` is not one."""
    if not hasattr(model, "config"):
        return None
    vision = _find_vision_transformer(model)
    if vision is None or len(vision.encoder.layers) < 2:
        return None
    config = getattr(vision, "config", None) or getattr(model.config, "vision_config", model.config)
    patch_conv = getattr(vision.embeddings, "patch_embedding", None)
    return Tower(
        backend="hf",
        blocks=tuple(vision.encoder.layers),
        embed=_embed_fn(model),
        final_norm=vision.post_layernorm,
        own_head=vision.head,
        map_parts=lambda: hf_map_parts(vision.head),
        head_modules=(vision.post_layernorm, vision.head),
        token_dim=int(config.hidden_size),
        image_size=two_tuple(config.image_size),
        in_chans=int(getattr(patch_conv, "in_channels", getattr(config, "num_channels", 3))),
    )
