"""open_clip ``VisionTransformer`` (OpenAI CLIP, LAION, DataComp, DFN, MetaCLIP, CoCa): class token, average or
attention pool, then ``ln_post`` and ``proj``.

The model's own image embedding is ``visual(x)`` = ``_pool(transformer(_embeds(x)))[0] @ proj``, where ``_pool``
follows ``attn_pool`` / ``pool_type`` / ``final_ln_after_pool``. Layer j is block j's output read the same way:

- ``pool_type='tok'``, no attn_pool (CLIP): ln_post(h_j[:, 0]) @ proj (token_head.class_token_head: ln_post
  is per token, so taking the class token first is exact and nothing runs over all tokens);
- ``pool_type='avg'``, or an ``attn_pool`` (CoCa: attention pool, ln_post, then its pool_type): the model's own
  ``_pool(h_j)`` then ``@ proj`` (token_head.pooled_head).

Detected, not assumed: other forms (pool_type='none' without a pooled vector, the WIP 'parallel'/'cascade'
contrastive pools, sequence-first transformers of old open_clip) raise a ValueError naming the supported ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.readout import token_head
from siglip_dola.readout.towers import Tower, two_tuple

ORDER = 20   # readout.TOWERS is matched in ORDER
FORMS = ("open_clip VisionTransformer towers (OpenAI CLIP, LAION, DataComp, DFN, MetaCLIP, CoCa; e.g. ViT-L-14-336) "
         "with a class-token, average or CoCa attention-pool head")   # what build() accepts, for readout.SUPPORTED

VISUAL_ATTRS = ("conv1", "class_embedding", "transformer", "ln_post", "proj", "_pool", "_global_pool", "pool_type")
SUPPORTED_HEADS = ("class token (pool_type='tok'), average (pool_type='avg'), or CoCa's attention pool "
                   "(attentional_pool=True with pool_type 'tok'/'avg')")


def _is_visual(module) -> bool:
    return (isinstance(module, nn.Module) and all(hasattr(module, name) for name in VISUAL_ATTRS)
            and isinstance(getattr(module.transformer, "resblocks", None), nn.ModuleList)
            and len(module.transformer.resblocks) >= 2)


def _first(output) -> torch.Tensor:
    """visual / encode_image output -> (B, D): with output_tokens=True (CoCa) it is (pooled, tokens)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _head_form(visual) -> str:
    """"token" | "pooled" for a supported head, else ValueError naming the supported forms."""
    if not getattr(visual.transformer, "batch_first", True):
        raise ValueError("open_clip VisionTransformer runs its blocks sequence-first (batch_first=False, "
                         "open_clip < 2.24): upgrade open_clip")
    attn_pool = getattr(visual, "attn_pool", None)
    pool_type = visual.pool_type
    if attn_pool is None and pool_type == "tok":
        return "token"
    if attn_pool is None and pool_type == "avg":
        return "pooled"
    if (attn_pool is not None and getattr(visual, "attn_pool_contrastive", None) is None
            and pool_type in ("tok", "avg")):
        return "pooled"
    form = (f"attn_pool={type(attn_pool).__name__}, attn_pool_type={getattr(visual, 'attn_pool_type', '')!r}, "
            f"pool_type={pool_type!r}")
    raise ValueError(f"open_clip VisionTransformer head ({form}) does not pool to one vector per image; "
                     f"supported: {SUPPORTED_HEADS}")


def _project(visual):
    def project(pooled: torch.Tensor) -> torch.Tensor:   # (..., P) -> (..., D_out), as visual.forward does
        return pooled @ visual.proj if visual.proj is not None else pooled
    return project


def _layer_head_fn(visual, form: str):
    project = _project(visual)
    own = lambda tokens: project(visual._pool(tokens)[0])  # noqa: E731  the model's own pooling + projection

    def layer_head(folded: bool) -> token_head.LayerHead:
        if not folded:
            return token_head.own_head(own)
        if form == "token":
            return token_head.class_token_head(visual.ln_post, project)
        return token_head.pooled_head(lambda tokens: visual._pool(tokens)[0], project)
    return layer_head, own


def _locate(model):
    """(visual, embed) for an open_clip CLIP / CoCa (``.visual``) or a bare VisionTransformer, else None."""
    if _is_visual(model):
        return model, lambda images: _first(model(images))
    visual = getattr(model, "visual", None)
    if not _is_visual(visual):
        return None
    if hasattr(model, "encode_image"):   # raw: CoCa's encode_image normalises unless told not to
        return visual, lambda images: _first(model.encode_image(images, normalize=False))
    return visual, lambda images: _first(visual(images))


def build(model) -> Tower | None:
    """A Tower for an open_clip VisionTransformer (or a model holding one at ``.visual``), else None."""
    located = _locate(model)
    if located is None:
        return None
    visual, embed = located
    layer_head, own = _layer_head_fn(visual, _head_form(visual))
    head_modules = tuple(m for m in (visual.ln_post, getattr(visual, "attn_pool", None)) if isinstance(m, nn.Module))
    return Tower(
        backend="open_clip",
        blocks=tuple(visual.transformer.resblocks),
        embed=embed,
        final_norm=nn.Identity(),        # ln_post is part of own_head: with final_ln_after_pool it follows pooling
        own_head=own,
        map_parts=lambda: None,
        head_modules=head_modules,
        token_dim=int(visual.conv1.out_channels),
        image_size=two_tuple(visual.image_size),
        in_chans=int(visual.conv1.in_channels),
        layer_head=layer_head,
    )
