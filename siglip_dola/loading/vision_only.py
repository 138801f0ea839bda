"""Vision-only towers (a timm VisionTransformer, a Janus tower): no text encoder, the user brings a bank."""
from __future__ import annotations

import math

import torch

from siglip_dola.loading.parts import AdapterParts

# A vision-only tower stores no logit scale: from_model takes it from the text checkpoint or logit_scale=
# (borrowed.finish), never from a default; NaN until then, so a missed case cannot score quietly.
NO_LOGIT_SCALE = math.nan
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)


def is_model(model) -> bool:
    """Any torch module: the readout decides whether it can read it (timm ViT, Janus tower / wrapper)."""
    return isinstance(model, torch.nn.Module)


def parts(model, preprocess=None, tokenizer=None, image_size=None) -> AdapterParts:
    """Preprocess for a vision-only tower; encode_text is None, no logit scale (NaN) and bias 0."""
    if tokenizer is not None:
        raise TypeError("tokenizer= is only for models with a text tower (open_clip, HF SiglipModel)")
    return AdapterParts(
        preprocess=preprocess if preprocess is not None else _default_preprocess(model, image_size),
        encode_text=None,
        logit_scale=NO_LOGIT_SCALE,
        logit_bias=0.0,
    )


def _default_preprocess(model, image_size):
    """timm's own eval transform when the module carries a timm pretrained_cfg, else SigLIP's (mean=std=0.5)."""
    import timm.data

    if getattr(model, "pretrained_cfg", None):
        config = timm.data.resolve_data_config({}, model=model)
        return timm.data.create_transform(**config, is_training=False)
    if image_size is None:
        raise TypeError("pass preprocess= for this model (its input size could not be determined)")
    return timm.data.create_transform(
        input_size=(3, *image_size), interpolation="bicubic", mean=SIGLIP_MEAN_STD, std=SIGLIP_MEAN_STD,
        crop_pct=1.0, is_training=False,
    )
