"""Backend adapters, dispatched through a plain dict: each ``build(model)`` returns a Tower or None."""
from __future__ import annotations

from siglip_dola.readout.adapters import hf, timm

ADAPTERS = {"timm": timm.build, "hf": hf.build}

SUPPORTED = (
    "timm VisionTransformer with a MAP head (global_pool='map', e.g. vit_large_patch16_siglip_384); "
    "open_clip SigLIP models (model.visual.trunk is such a tower, e.g. ViT-L-16-SigLIP-384) or their .visual; "
    "Janus-style towers (timm 0.9 VisionTransformer with attn_pool), their CLIPVisionTower "
    "(.vision_tower, optional .image_norm) or MultiModalityCausalLM (.vision_model); "
    "Hugging Face SiglipModel / SiglipVisionModel with vision_use_head=True"
)
