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

from siglip_dola.readout import hf_parts, token_head
from siglip_dola.readout.towers import Tower, two_tuple

ORDER = 50   # readout.TOWERS is matched in ORDER
FORMS = "Hugging Face CLIPModel / CLIPVisionModelWithProjection / CLIPVisionModel"   # for readout.SUPPORTED


def _is_clip_vision(vision) -> bool:
    """CLIP's layout: a pre_layrnorm before the encoder and no pooling head."""
    return isinstance(getattr(vision, "pre_layrnorm", None), nn.Module) and getattr(vision, "head", None) is None


def _embed_fn(model):
    if not hasattr(model, "get_image_features") and isinstance(getattr(model, "visual_projection", None), nn.Module):
        return lambda images: model(pixel_values=images).image_embeds    # CLIPVisionModelWithProjection
    return hf_parts.embed_fn(model)        # CLIPModel: get_image_features; CLIPVisionModel: pooler_output


def build(model) -> Tower | None:
    """A Tower for a HF CLIP vision model (class-token head), or None when ``model`` is not one."""
    vision = hf_parts.find_vision(model, _is_clip_vision)
    if vision is None:
        return None
    projection = getattr(model, "visual_projection", None)
    project = projection if isinstance(projection, nn.Module) else nn.Identity()
    config = hf_parts.vision_config(model, vision)
    norm = vision.post_layernorm
    own = lambda tokens: project(norm(tokens[:, 0]))  # noqa: E731  the model's own: pooled = h[:, 0], then norm

    def layer_head(folded: bool) -> token_head.LayerHead:
        return token_head.class_token_head(norm, project) if folded else token_head.own_head(own)

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
        in_chans=hf_parts.in_channels(vision, config),
        layer_head=layer_head,
    )

