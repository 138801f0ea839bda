"""Janus as transformers ships it (4.53+): ``JanusVisionModel``, alone or inside ``JanusModel`` (``.vision_model``)
or ``JanusForConditionalGeneration`` (``.model.vision_model``). Never imported: found by its config's model_type.

The conversion dropped SigLIP's MAP head: the tower is embeddings -> encoder.layers -> post_layernorm, and the
aligner reads ``post_layernorm(h_N)`` (``last_hidden_state``). So :func:`build` refuses (no head to read layers
through) and :func:`trunk` hands the blocks and post_layernorm to borrowed_head.py, which reads them through
a SigLIP checkpoint's head. ``hidden_states[j]`` (output_hidden_states=True) is block j's raw output.
"""
from __future__ import annotations

from siglip_dola.readout import hf_parts
from siglip_dola.readout.towers import Trunk, two_tuple

ORDER = 60   # readout.TOWERS is matched in ORDER
FORMS = ("with head_from: transformers' JanusVisionModel / JanusModel / JanusForConditionalGeneration")   # for readout.SUPPORTED

MODEL_TYPE = "janus_vision_model"
NO_HEAD = ("{name}: transformers' Janus vision tower has no pooling head (its conversion dropped SigLIP's MAP head), "
           "so no layer can be read as an embedding; pass head_from (the SigLIP checkpoint whose head and text "
           "tower to use, e.g. 'google/siglip-large-patch16-384' or 'ViT-L-16-SigLIP-384:webli')")


def find_vision(model):
    """The JanusVisionModel at model, model.vision_model or model.model.vision_model, else None."""
    for candidate in (model, getattr(model, "vision_model", None),
                      getattr(getattr(model, "model", None), "vision_model", None)):
        config = getattr(candidate, "config", None)
        if (getattr(config, "model_type", None) == MODEL_TYPE and hf_parts.is_vision_transformer(candidate)
                and len(candidate.encoder.layers) >= 2):
            return candidate
    return None


def build(model):
    """Never a Tower: a transformers Janus model has no head of its own (ValueError naming head_from); None otherwise."""
    if find_vision(model) is not None:
        raise ValueError(NO_HEAD.format(name=type(model).__name__))
    return None


def trunk(model) -> Trunk | None:
    """The Janus vision trunk (blocks, post_layernorm, its own forward's last_hidden_state), or None."""
    vision = find_vision(model)
    if vision is None:
        return None
    config = vision.config
    return Trunk(
        backend="hf",
        blocks=tuple(vision.encoder.layers),
        final_norm=vision.post_layernorm,
        tokens=lambda images: vision(pixel_values=images).last_hidden_state,   # post_layernorm(h_N), (B, T, D)
        token_dim=int(config.hidden_size),
        image_size=two_tuple(config.image_size),
        in_chans=hf_parts.in_channels(vision, config),
    )
