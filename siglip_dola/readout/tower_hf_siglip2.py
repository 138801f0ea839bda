"""Hugging Face transformers SigLIP2 NaFlex: ``Siglip2Model`` / ``Siglip2VisionModel`` (4.x and 5.x layouts).

NaFlex inputs are patches, not images: ``pixel_values`` (B, P, C*p*p) padded to P patches,
``pixel_attention_mask`` (B, P) (1: a real patch) and ``spatial_shapes`` (B, 2) (each image's patch grid).
The readout takes them as ``readout(pixel_values, layers, pixel_attention_mask=..., spatial_shapes=...)``,
or packed into one tensor per image (:func:`pack`: (1 + P, C*p*p), row 0 = the grid (h, w), then the
patches), so that the rest of the library (which stacks one tensor per image) carries over unchanged;
the mask of a packed image is its first h*w patches, as the Siglip2 processor pads at the end.
The model's embedding is ``head(post_layernorm(h_N), pixel_attention_mask)``: a MAP head whose attention
gives padding patches an additive finfo.min, i.e. weight 0. Layer j is ``head(post_layernorm(h_j), mask)``:
folded (map_head.fold) with the padding masked out of the softmax (token_head.masked_map_head), or the
model's own head modules called with the mask where the head does not fold.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.readout import hf_parts, token_head
from siglip_dola.readout.map_head import fold, hf_map_parts
from siglip_dola.readout.towers import Tower

ORDER = 30   # readout.TOWERS is matched in ORDER
FORMS = ("Hugging Face Siglip2Model / Siglip2VisionModel "
         "(NaFlex: pass pixel_attention_mask= and spatial_shapes=)")   # for readout.SUPPORTED

MASK, SHAPES = "pixel_attention_mask", "spatial_shapes"


def _is_naflex(vision) -> bool:
    return type(vision.embeddings).__name__ == "Siglip2VisionEmbeddings"


def pack(pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    """Processor outputs (B, P, C*p*p) patches + (B, 2) grids -> packed (B, 1 + P, C*p*p) (see module doc)."""
    header = pixel_values.new_zeros(pixel_values.shape[0], 1, pixel_values.shape[-1])
    header[:, 0, :2] = spatial_shapes.to(header.dtype)
    return torch.cat([header, pixel_values], dim=1)


def unpack(packed: torch.Tensor) -> dict:
    """Packed (B, 1 + P, C*p*p) -> {pixel_values (B, P, C*p*p), pixel_attention_mask (B, P), spatial_shapes (B, 2)}."""
    shapes = packed[:, 0, :2].round().long()                                   # (B, 2)
    patches = packed[:, 1:]
    positions = torch.arange(patches.shape[1], device=packed.device)
    mask = (positions[None, :] < shapes.prod(-1, keepdim=True)).to(torch.int32)  # (B, P): real patches first
    return {"pixel_values": patches, MASK: mask, SHAPES: shapes}


def _embed_fn(model):
    method = model.get_image_features if hasattr(model, "get_image_features") else model

    def embed(pixel_values, pixel_attention_mask=None, spatial_shapes=None) -> torch.Tensor:
        return hf_parts.as_embedding(method(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                                            spatial_shapes=spatial_shapes))
    return embed


def _prepare_fn(patch_dim: int):
    def prepare(pixel_values, pixel_attention_mask=None, spatial_shapes=None) -> tuple[torch.Tensor, dict]:
        """Checked (pixel_values, {mask, shapes}); packed images are unpacked here."""
        _check(patch_dim, pixel_values, pixel_attention_mask, spatial_shapes)
        if pixel_attention_mask is None and spatial_shapes is None:
            unpacked = unpack(pixel_values)
            return unpacked.pop("pixel_values"), unpacked
        return pixel_values, {MASK: pixel_attention_mask, SHAPES: spatial_shapes}
    return prepare


def _check(patch_dim: int, pixel_values, pixel_attention_mask, spatial_shapes) -> None:
    """ValueError / TypeError naming the argument for NaFlex inputs that the model would misread."""
    expected = f"[B, P, {patch_dim}] patches (the Siglip2 processor's pixel_values)"
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point torch.Tensor {expected}, "
                        f"got {type(pixel_values).__name__}")
    if pixel_values.dim() != 3 or pixel_values.shape[-1] != patch_dim:
        raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
    if pixel_attention_mask is None and spatial_shapes is None:   # packed: the grid in row 0
        grids = pixel_values[:, 0, :2]
        if not (grids.round() == grids).all() or (grids < 1).any() or (
                grids.prod(-1) > pixel_values.shape[1] - 1).any():
            raise ValueError("packed NaFlex images must hold their patch grid (h, w) in row 0 "
                             "(tower_hf_siglip2.pack); or pass pixel_attention_mask= and spatial_shapes=")
        return
    if pixel_attention_mask is None or spatial_shapes is None:
        raise ValueError(f"a SigLIP2 NaFlex model needs both {MASK}= (B, P) and {SHAPES}= (B, 2) with "
                         "pixel_values, as its processor returns them (or packed images: tower_hf_siglip2.pack)")
    batch, patches = pixel_values.shape[:2]
    if tuple(pixel_attention_mask.shape) != (batch, patches):
        raise ValueError(f"{MASK} must have shape {(batch, patches)}, got {tuple(pixel_attention_mask.shape)}")
    if tuple(spatial_shapes.shape) != (batch, 2) or spatial_shapes.is_floating_point():
        raise ValueError(f"{SHAPES} must be an integer tensor of shape {(batch, 2)}, "
                         f"got {spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")


def _layer_head_fn(vision):
    norm, head = vision.post_layernorm, vision.head

    def layer_head(folded: bool) -> token_head.LayerHead:
        parts = hf_map_parts(head) if folded else None
        folded_head = fold(parts, norm) if parts is not None else None
        if folded_head is None:
            return token_head.own_masked_head(norm, head, MASK)
        return token_head.masked_map_head(folded_head, MASK)
    return layer_head


def build(model) -> Tower | None:
    """A Tower for a HF SigLIP2 NaFlex model, or None when ``model`` is not one."""
    vision = hf_parts.find_vision(model, _is_naflex)
    if vision is None:
        return None
    if not isinstance(getattr(vision, "head", None), nn.Module):
        raise ValueError("Siglip2 vision model without a pooling head (vision_use_head=False) has no image "
                         "embedding to read layers into; supported: Siglip2Model / Siglip2VisionModel with the head")
    patch = vision.embeddings.patch_embedding                                 # nn.Linear(C*p*p, D)
    config = hf_parts.vision_config(model, vision)
    return Tower(
        backend="hf",
        blocks=tuple(vision.encoder.layers),
        embed=_embed_fn(model),
        final_norm=vision.post_layernorm,
        own_head=vision.head,
        map_parts=lambda: None,
        head_modules=(vision.post_layernorm, vision.head),
        token_dim=int(config.hidden_size),
        image_size=(0, 0),                                                    # NaFlex: any patch grid
        in_chans=int(getattr(config, "num_channels", 3)),
        dynamic_size=True,
        layer_head=_layer_head_fn(vision),
        extra_inputs=(MASK, SHAPES),
        prepare_inputs=_prepare_fn(int(patch.in_features)),
    )
