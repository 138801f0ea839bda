"""Hugging Face transformers CLIP: ``CLIPModel``, ``CLIPVisionModelWithProjection``, ``CLIPVisionModel`` (4.x and 5.x).

The vision transformer (embeddings, pre_layrnorm, encoder.layers, post_layernorm) is ``model`` itself
(5.x CLIPVisionModel), ``model.vision_model`` or ``model.vision_model.vision_model``. HF applies
``pre_layrnorm`` to the embeddings BEFORE the encoder, so ``hidden_states[0]`` is that normed embedding and
``hidden_states[j]`` is block j's output (what the hook on ``encoder.layers[j-1]`` sees). The embedding is
``visual_projection(post_layernorm(h_N[:, 0]))`` (no projection for a bare CLIPVisionModel); layer j is
read the same way from h_j (token_head.class_token_head: one token per layer, no pooling kernel).
"""
from __future__ import annotations

import torch.nn as nn

from siglip_dola.readout import token_head
from siglip_dola.readout.tower_hf import _as_embedding
from siglip_dola.readout.towers import Tower, two_tuple


def _is_clip_vision(module) -> bool:
    encoder = getattr(module, "encoder", None)
    return (isinstance(module, nn.Module) and hasattr(module, "embeddings")
            and isinstance(getattr(module, "pre_layrnorm", None), nn.Module)
            and isinstance(getattr(encoder, "layers", None), nn.ModuleList)
            and isinstance(getattr(module, "post_layernorm", None), nn.Module)
            and getattr(module, "head", None) is None)


def _find_vision(model):
    candidate = model
    for _ in range(3):
        if _is_clip_vision(candidate):
            return candidate
        candidate = getattr(candidate, "vision_model", None)
        if candidate is None:
            return None
    return None


def _embed_fn(model):
    if hasattr(model, "get_image_features"):                 # CLIPModel
        return lambda images: _as_embedding(model.get_image_features(pixel_values=images))
    if isinstance(getattr(model, "visual_projection", None), nn.Module):   # CLIPVisionModelWithProjection
        return lambda images: model(pixel_values=images).image_embeds
    return lambda images: _as_embedding(model(pixel_values=images))       # CLIPVisionModel: pooler_output


def build(model) -> Tower | None:
    """A Tower for a HF CLIP vision model (class-token head), or None when ``model`` is not one."""
    if not hasattr(model, "config"):
        return None
    vision = _find_vision(model)
    if vision is None or len(vision.encoder.layers) < 2:
        return None
    projection = getattr(model, "visual_projection", None)
    project = projection if isinstance(projection, nn.Module) else nn.Identity()
    config = getattr(vision, "config", None) or getattr(model.config, "vision_config", model.config)
    norm = vision.post_layernorm
    own = lambda tokens: project(norm(tokens[:, 0]))  # noqa: E731  the model's own: pooled = h[:, 0], then norm

    def layer_head(folded: bool) -> token_head.LayerHead:
        return token_head.class_token_head(norm, project) if folded else token_head.own_head(own)

    patch_conv = getattr(vision.embeddings, "patch_embedding", None)
    return Tower(
        backend="hf",
        blocks=tuple(vision.encoder.layers),
        embed=_embed_fn(model),
        final_norm=nn.Identity(),       # the model norms the pooled token, not the tokens: own_head does both
        own_head=own,
        map_parts=lambda: None,
        head_modules=tuple(m for m in (norm, projection) if isinstance(m, nn.Module)),
        token_dim=int(config.hidden_size),
        image_size=two_tuple(config.image_size),
        in_chans=int(getattr(patch_conv, "in_channels", getattr(config, "num_channels", 3))),
        layer_head=layer_head,
    )

