"""timm-style towers: timm VisionTransformer with a MAP head, open_clip SigLIP (``visual.trunk``), Janus (duck typed);
and timm towers with a class-token or average head (timm CLIP ViTs, timm Eva: open_clip's EVA models).

Class-token towers (``global_pool='token'``, no attn_pool) read layer j as head(fc_norm(norm(h_j[:, 0]))): the
final norm is per token, so taking the class token first is exact (token_head.class_token_head). Other pools
(``'avg'``, ...) go through the tower's own ``forward_head(norm(h_j))``.

Janus (never imported) holds timm 0.9's VisionTransformer built with ``ignore_head=True`` at
``MultiModalityCausalLM.vision_model.vision_tower``; its ``vision_model`` (CLIPVisionTower) applies
``image_norm`` (if set) first. Its forward returns the normed tokens, so its embedding is
``tower.forward_head(tower.forward_features(image_norm(x)))``, the same as a plain timm tower's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.readout import token_head
from siglip_dola.readout.map_head import timm_map_parts
from siglip_dola.readout.towers import Tower, two_tuple

TOWER_ATTRS = ("blocks", "norm", "attn_pool", "forward_features", "forward_head", "patch_embed")
POOLED_GLOBAL_POOLS = ("token", "avg", "max", "avgmax")   # timm global_pool values without attention pooling


def _is_tower(module) -> bool:
    if not (isinstance(module, nn.Module) and all(hasattr(module, name) for name in TOWER_ATTRS)
            and len(module.blocks) >= 2):
        return False
    return isinstance(module.attn_pool, nn.Module) or _plain_pool(module)


def _plain_pool(tower) -> bool:
    """A timm tower pooling without attention (class token / average): no attn_pool, a known global_pool."""
    return tower.attn_pool is None and getattr(tower, "global_pool", None) in POOLED_GLOBAL_POOLS


def _class_token(tower) -> bool:
    return (getattr(tower, "global_pool", None) == "token" and getattr(tower, "num_prefix_tokens", 0) >= 1
            and isinstance(tower.norm, (nn.LayerNorm, nn.Identity)))   # per-token: norm(h)[:, 0] == norm(h[:, 0])


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _locate(model):
    """(tower, image_norm, outer_head, embed) for a supported model, else None."""
    if _is_tower(model):
        return model, None, None, None
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if _is_tower(trunk) and isinstance(getattr(visual, "head", None), nn.Module):   # open_clip TimmModel
        embed = model.encode_image if hasattr(model, "encode_image") and visual is not model else visual
        return trunk, None, visual.head, embed
    clip_tower = getattr(model, "vision_model", model)                               # Janus LM -> CLIPVisionTower
    tower = getattr(clip_tower, "vision_tower", None)
    if _is_tower(tower):
        return tower, getattr(clip_tower, "image_norm", None), None, None
    return None


def _tower_embed(tower, image_norm):
    def embed(images: torch.Tensor) -> torch.Tensor:
        if image_norm is not None:
            images = image_norm(images)
        return tower.forward_head(tower.forward_features(images))
    return embed


def _post_pool(tower, outer_head):
    """What timm's forward_head (and open_clip's head) does after attention pooling: (B, D) -> (B, D_out)."""
    outer = outer_head if outer_head is not None else _identity
    fc_norm = getattr(tower, "fc_norm", nn.Identity())
    head_drop = getattr(tower, "head_drop", nn.Identity())
    head = getattr(tower, "head", nn.Identity())
    return lambda pooled: outer(head(head_drop(fc_norm(pooled))))


def _map_parts_fn(tower, outer_head):
    def map_parts():
        if getattr(tower, "num_prefix_tokens", 0) != 0 or getattr(tower, "global_pool", "map") != "map":
            return None   # prefix-token slicing differs across timm versions: use the model's own head
        return timm_map_parts(tower.attn_pool, _post_pool(tower, outer_head))
    return map_parts


def _own_head(tower, outer_head):
    if outer_head is None:
        return lambda normed: tower.forward_head(normed)
    return lambda normed: outer_head(tower.forward_head(normed))


def _layer_head_fn(tower, outer_head):
    """Tower.layer_head for class-token / average towers (None for MAP towers: the folded MAP head)."""
    if not _plain_pool(tower):
        return None
    own = _own_head(tower, outer_head)
    post = _post_pool(tower, outer_head)

    def layer_head(folded: bool) -> token_head.LayerHead:
        if folded and _class_token(tower):
            return token_head.class_token_head(tower.norm, post)
        return token_head.own_head(lambda tokens: own(tower.norm(tokens)))
    return layer_head


def build(model) -> Tower | None:
    """A Tower for timm / open_clip / Janus-style models, or None when ``model`` is none of them."""
    located = _locate(model)
    if located is None:
        return None
    tower, image_norm, outer_head, embed = located
    patch_embed = tower.patch_embed
    size = getattr(patch_embed, "img_size", None) or getattr(model, "image_size", None)
    dynamic = bool(getattr(tower, "dynamic_img_size", False)) or not getattr(patch_embed, "strict_img_size", True)
    proj = getattr(patch_embed, "proj", None)
    head_modules = tuple(m for m in (tower.norm, tower.attn_pool, getattr(tower, "fc_norm", None),
                                     getattr(tower, "head", None), outer_head) if isinstance(m, nn.Module))
    return Tower(
        backend="timm",
        blocks=tuple(tower.blocks),
        embed=embed if embed is not None else _tower_embed(tower, image_norm),
        final_norm=tower.norm,
        own_head=_own_head(tower, outer_head),
        map_parts=_map_parts_fn(tower, outer_head),
        head_modules=head_modules,
        token_dim=int(getattr(tower, "embed_dim", None) or tower.num_features),
        image_size=two_tuple(size) if size is not None else (0, 0),
        in_chans=int(getattr(proj, "in_channels", 3)),
        dynamic_size=dynamic or size is None,
        layer_head=_layer_head_fn(tower, outer_head),
    )
