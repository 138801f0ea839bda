"""Hugging Face transformers SigLIP: ``SiglipModel`` / ``SiglipVisionModel`` (4.x and 5.x layouts).

The vision transformer (embeddings, encoder.layers, post_layernorm, head) sits at ``model`` itself
(5.x SiglipVisionModel), ``model.vision_model`` (4.x SiglipVisionModel, any SiglipModel) or
``model.vision_model.vision_model`` (5.x SiglipModel), found by hf_parts.find_vision. ``hidden_states[j]`` is
block j's output; the embedding is ``head(post_layernorm(h_N))`` = ``get_image_features`` / ``pooler_output``.
"""
from __future__ import annotations

import torch.nn as nn

from siglip_dola.readout import hf_parts
from siglip_dola.readout.map_head import hf_map_parts
from siglip_dola.readout.towers import Tower, Trunk, two_tuple

ORDER = 40   # after tower_hf_siglip2: this build also accepts NaFlex vision models
FORMS = "Hugging Face SiglipModel / SiglipVisionModel with vision_use_head=True"   # for readout.SUPPORTED


def _has_map_head(vision) -> bool:
    return isinstance(getattr(vision, "head", None), nn.Module)


def build(model) -> Tower | None:
    """A Tower for a HF SigLIP vision model with a pooling head, or None when ``model`` is not one."""
    vision = hf_parts.find_vision(model, _has_map_head)
    if vision is None:
        return None
    config = hf_parts.vision_config(model, vision)
    return Tower(
        backend="hf",
        blocks=tuple(vision.encoder.layers),
        embed=hf_parts.embed_fn(model),
        final_norm=vision.post_layernorm,
        own_head=vision.head,
        map_parts=lambda: hf_map_parts(vision.head),
        head_modules=(vision.post_layernorm, vision.head),
        token_dim=int(config.hidden_size),
        image_size=two_tuple(config.image_size),
        in_chans=hf_parts.in_channels(vision, config),
    )


def trunk(model) -> Trunk | None:
    """The blocks and post_layernorm of a HF SigLIP vision model (its own head left out), or None."""
    vision = hf_parts.find_vision(model, _has_map_head)
    if vision is None:
        return None
    config = hf_parts.vision_config(model, vision)
    return Trunk(backend="hf", blocks=tuple(vision.encoder.layers), final_norm=vision.post_layernorm,
                 tokens=lambda images: vision(pixel_values=images).last_hidden_state,   # post_layernorm(h_N)
                 token_dim=int(config.hidden_size), image_size=two_tuple(config.image_size),
                 in_chans=hf_parts.in_channels(vision, config))
