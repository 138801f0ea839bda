"""A trunk read through another model's head: DoLa on a tower whose own head is missing or untrusted (Janus).

    layer j:  z_j = head(final_norm(h_j))          z_final = head(final_norm(h_N)) = head(trunk.tokens(images))

``final_norm`` is the TRUNK's own final norm (Janus's ``post_layernorm``): the norm trained, and fine-tuned,
with these blocks; Janus's aligner reads exactly ``post_layernorm(h_N)``, so the borrowed head sees the tokens
Janus itself uses. ``head`` is the head model's MAP head called as that model calls it (timm ``forward_head``:
attention pool, its norm + MLP residual, fc_norm, head; open_clip's ``visual.head`` after it; HF
``SiglipMultiheadAttentionPoolingHead``); the head model's own final norm is not used. The readout folds the
head with the trunk's norm as it does for any SigLIP (map_head.py) and checks the fold against these modules.
Nothing of either model is written.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from siglip_dola.readout.towers import Tower, Trunk


def _param(modules) -> torch.Tensor | None:
    return next((p for module in modules if isinstance(module, nn.Module) for p in module.parameters()), None)


def with_head(trunk: Trunk, head: Tower, head_name: str = "head_from") -> Tower:
    """A Tower with the trunk's blocks, final norm and forward, and ``head``'s MAP head (ValueError naming head_from)."""
    if head.layer_head is not None:
        raise ValueError(f"{head_name} must have a MAP (attention-pooling) head, as SigLIP has; this model reads "
                         "its embedding from a class token or an average of tokens")
    if head.token_dim != trunk.token_dim:
        raise ValueError(f"{head_name}'s head reads tokens of width {head.token_dim}, the vision tower's blocks give "
                         f"{trunk.token_dim}: it is not the SigLIP the tower came from")
    head_only = tuple(module for module in head.head_modules if module is not head.final_norm)
    own, theirs = _param((trunk.final_norm,)), _param(head_only)
    if own is not None and theirs is not None and (own.device, own.dtype) != (theirs.device, theirs.dtype):
        raise ValueError(f"{head_name}'s head is {theirs.dtype} on {theirs.device}, the vision tower "
                         f"{own.dtype} on {own.device}: put both on one device and dtype")
    own_head, tokens = head.own_head, trunk.tokens
    return Tower(
        backend=trunk.backend,
        blocks=trunk.blocks,
        embed=lambda images: own_head(tokens(images)),
        final_norm=trunk.final_norm,
        own_head=own_head,
        map_parts=head.map_parts,
        head_modules=(*head_only, trunk.final_norm),   # the head's first: its dtype and device probe the fold
        token_dim=trunk.token_dim,
        image_size=trunk.image_size,
        in_chans=trunk.in_chans,
        dynamic_size=trunk.dynamic_size,
    )
