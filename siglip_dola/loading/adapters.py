"""Backend adapters for `siglip_dola.loading`, dispatched through a plain dict (checked in order)."""
from __future__ import annotations

from siglip_dola.loading import hf
from siglip_dola.loading import open_clip
from siglip_dola.loading import vision_only

# Order matters: the vision-only `timm` adapter accepts any torch module, so it comes last.
ADAPTERS = {"open_clip": open_clip, "hf": hf, "timm": vision_only}


def backend_of(model) -> str:
    """Name of the first adapter that accepts `model`."""
    for name, adapter in ADAPTERS.items():
        if adapter.is_model(model):
            return name
    raise TypeError(f"model must be an open_clip CLIP / CoCa, a transformers SiglipModel / CLIPModel / Siglip2Model or a torch.nn.Module; "
                    f"got {type(model).__name__}")
