"""timm-style towers: timm VisionTransformer with a MAP head, open_clip SigLIP (``visual.trunk``), Janus (duck typed);
and timm towers with a class-token or average head (timm CLIP ViTs, timm Eva: open_clip's EVA models).

Class-token towers (``global_pool='token'``, no attn_pool) read layer j as head(fc_norm(norm(h_j[:, 0]))): the
final norm is per token, so taking the class token first is exact (token_head.class_token_head). Other pools
(``'avg'``, ...) go through the tower's own ``forward_head(norm(h_j))``.

Janus (never imported) holds timm 0.9's VisionTransformer built with ``ignore_head=True`` at
``MultiModalityCausalLM.vision_model.vision_tower``; its ``vision_model`` (CLIPVisionTower) applies
``image_norm`` (if set) first. Its forward returns the normed tokens, so its embedding is
``tower.forward_head(tower.forward_features(image_norm(x)))``, the same as a plain timm tower's.
Janus never calls that head (``ignore_head=True``), so its checkpoints may hold it at any values: a Janus tower
whose ``attn_pool.norm`` is exactly at its initial values (gamma = 1, beta = 0; no trained head has that) is
refused, and :func:`trunk` lets borrowed_head.py read it through a SigLIP checkpoint's head instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.readout import token_head
from siglip_dola.readout.map_head import timm_map_parts
from siglip_dola.readout.towers import Tower, Trunk, two_tuple

UNTRUSTED_HEAD = ("{name}: the Janus tower's attn_pool LayerNorm is exactly at its initial values (gamma = 1, "
                  "beta = 0): Janus never uses this head, and no trained head has these values; pass head_from "
                  "(the SigLIP checkpoint the tower came from, e.g. 'google/siglip-large-patch16-384' or "
                  "'ViT-L-16-SigLIP-384:webli') to read it through that checkpoint's head")

ORDER = 10   # readout.TOWERS is matched in ORDER
FORMS = ("timm VisionTransformer with a MAP head (global_pool='map', e.g. vit_large_patch16_siglip_384); "
         "open_clip SigLIP models (model.visual.trunk is such a tower, e.g. ViT-L-16-SigLIP-384) or their .visual; "
         "Janus-style towers (timm 0.9 VisionTransformer with attn_pool), their CLIPVisionTower "
         "(.vision_tower, optional .image_norm) or MultiModalityCausalLM (.vision_model); "
         "timm towers with a class-token or average head (global_pool='token'/'avg': timm CLIP ViTs, Eva, "
         "open_clip's EVA models at model.visual.trunk)")   # what build() accepts, for readout.SUPPORTED

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
    """(tower, image_norm, outer_head, embed, is_janus) for a supported model, else None."""
    if _is_tower(model):
        return model, None, None, None, type(model).__module__.split(".")[0] == "janus"   # the janus package's ViT
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)
    if _is_tower(trunk) and isinstance(getattr(visual, "head", None), nn.Module):   # open_clip TimmModel
        embed = model.encode_image if hasattr(model, "encode_image") and visual is not model else visual
        return trunk, None, visual.head, embed, False
    clip_tower = getattr(model, "vision_model", model)                               # Janus LM -> CLIPVisionTower
    tower = getattr(clip_tower, "vision_tower", None)
    if _is_tower(tower):
        return tower, getattr(clip_tower, "image_norm", None), None, None, True
    return None


def _head_at_init(tower) -> bool:
    """True when attn_pool's LayerNorm is exactly gamma = 1, beta = 0 (how timm initialises it)."""
    norm = getattr(tower.attn_pool, "norm", None)
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        return False
    with torch.no_grad():
        return bool((norm.weight == 1).all()) and (norm.bias is None or bool((norm.bias == 0).all()))


def _tower_tokens(tower, image_norm):
    def tokens(images: torch.Tensor) -> torch.Tensor:
        return tower.forward_features(image_norm(images) if image_norm is not None else images)   # norm(h_N)
    return tokens


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
    tower, image_norm, outer_head, embed, is_janus = located
    if is_janus and isinstance(tower.attn_pool, nn.Module) and _head_at_init(tower):
        raise ValueError(UNTRUSTED_HEAD.format(name=type(model).__name__))
    size, dynamic, in_chans = _input_shape(tower, model)
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
        image_size=size,
        in_chans=in_chans,
        dynamic_size=dynamic,
        layer_head=_layer_head_fn(tower, outer_head),
    )


def _input_shape(tower, model) -> tuple[tuple[int, int], bool, int]:
    """(image size, whether other sizes are accepted, input channels) of a timm tower."""
    patch_embed = tower.patch_embed
    size = getattr(patch_embed, "img_size", None) or getattr(model, "image_size", None)
    dynamic = bool(getattr(tower, "dynamic_img_size", False)) or not getattr(patch_embed, "strict_img_size", True)
    proj = getattr(patch_embed, "proj", None)
    return (two_tuple(size) if size is not None else (0, 0)), dynamic or size is None, int(getattr(proj, "in_channels", 3))


def trunk(model) -> Trunk | None:
    """The blocks and final norm of a timm / open_clip / Janus-style tower, its head left out (any head, trusted or not)."""
    located = _locate(model)
    if located is None:
        return None
    tower, image_norm = located[0], located[1]
    size, dynamic, in_chans = _input_shape(tower, model)
    return Trunk(backend="timm", blocks=tuple(tower.blocks), final_norm=tower.norm,
                 tokens=_tower_tokens(tower, image_norm),
                 token_dim=int(getattr(tower, "embed_dim", None) or tower.num_features),
                 image_size=size, in_chans=in_chans, dynamic_size=dynamic)
