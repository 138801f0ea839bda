"""One-pass layer readout for SigLIP / SigLIP2 / CLIP-family vision towers.

    readout = from_model(model)
    z_final, z_layers = readout(images, layers=[18, 20, 22])   # (B, D), (J, B, D): raw, not normalised

z_final is exactly the model's own image embedding; z_layers[i] = head(norm(h_j)) for j = layers[i],
read through the same final norm and head: SigLIP's MAP head folded (map_head.py); CLIP's class token,
then ln_post and proj (token_head.py); NaFlex's MAP head with its padding masked. One backbone forward per call.

``from_model(model, head_from=siglip)`` reads ``model``'s blocks and final norm through ``siglip``'s head
(borrowed_head.py): Janus, whose tower has no head (transformers) or one it never trained (its repository).
"""
from __future__ import annotations

import importlib
import pkgutil

import torch.nn as nn

from siglip_dola.readout.borrowed_head import with_head
from siglip_dola.readout.readout import Readout


def _tower_modules() -> dict:
    """Every ``tower_*.py`` of this package, by name without ``tower_``, in increasing ``ORDER``: each module's
    ``build(model)`` returns a Tower or None (or raises ValueError for a recognised tower whose head form is not
    supported), its ``FORMS`` says what it accepts. A new tower is one new file; it takes an ORDER below any tower
    whose build would also accept its models (SigLIP2 NaFlex before "hf": its vision model also has embeddings /
    encoder / post_layernorm / head)."""
    names = [info.name for info in pkgutil.iter_modules(__path__) if info.name.startswith("tower_")]
    modules = {name.removeprefix("tower_"): importlib.import_module(f"{__name__}.{name}") for name in names}
    return dict(sorted(modules.items(), key=lambda item: item[1].ORDER))


TOWERS = _tower_modules()
SUPPORTED = "; ".join(tower.FORMS for tower in TOWERS.values())
# Trunks (blocks + final norm, no head) that ``head_from`` can complete: a tower module's trunk(model) -> Trunk or None.
TRUNKS = {name: module.trunk for name, module in TOWERS.items() if hasattr(module, "trunk")}
TRUNKS_SUPPORTED = ("transformers' JanusVisionModel / JanusModel / JanusForConditionalGeneration; Janus's own "
                    "MultiModalityCausalLM / CLIPVisionTower / its timm-style ViT; timm ViTs; open_clip SigLIP; "
                    "HF SiglipModel / SiglipVisionModel")

__all__ = ["Readout", "from_model", "SUPPORTED"]


def from_model(model, folded_head: bool = True, head_from: nn.Module | None = None) -> Readout:
    """A Readout for ``model`` (timm / open_clip / Janus-style / HF SigLIP, CLIP, SigLIP2); the model is only read, never changed.

    ``folded_head=False`` reads every layer through the model's own head modules (for comparison/benchmarks).
    ``head_from``: a SigLIP model (any form above with a MAP head) whose head reads ``model``'s layers instead of
    ``model``'s own (borrowed_head.py); ``model`` then needs only blocks and a final norm (TRUNKS_SUPPORTED).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; supported: {SUPPORTED}")
    if head_from is not None:
        return Readout(with_head(_trunk(model), _tower(head_from, "head_from")), folded_head=folded_head)
    return Readout(_tower(model, "model"), folded_head=folded_head)


def _trunk(model):
    for find in TRUNKS.values():
        trunk = find(model)
        if trunk is not None:
            return trunk
    raise ValueError(f"unsupported vision model {type(model).__name__} for head_from; supported: {TRUNKS_SUPPORTED}")


def _tower(model, name: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}; supported: {SUPPORTED}")
    for module in TOWERS.values():
        tower = module.build(model)
        if tower is not None:
            return tower
    raise ValueError(f"unsupported {name} {type(model).__name__}; supported: {SUPPORTED}")
