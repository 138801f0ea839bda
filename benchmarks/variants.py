"""Readout variants for benchmarks/overhead.py: settings of siglip_dola.config, set while each variant runs.

    with fused_config("onepass-stats"):   # = siglip_dola.config.override(entry_norms=False)
        readout(images, layers)
"""
from __future__ import annotations

import torch

from siglip_dola import config
from siglip_dola.readout import kernel

VARIANTS = {  # name -> siglip_dola.config options for that variant ("onepass-tuned": filled by --kernel-sweep)
    "unfused": dict(fused_pooling=False),                       # folded head per layer in PyTorch
    "onepass": dict(fused_pooling=True),                        # the library default on CUDA
    "onepass-tuned": dict(fused_pooling=True),
    "onepass-stats": dict(fused_pooling=True, entry_norms=False),   # pooled from raw block outputs (LayerNorm stats)
    "onepass-t32": dict(fused_pooling=True, block_t=32, num_stages=2),
}


def fused_config(variant: str):
    """A context setting the library's fast-path switches for one variant; restored afterwards."""
    return config.override(**VARIANTS[variant])


def usable_variants(args, device: torch.device) -> list[str]:
    fast = device.type == "cuda" and kernel.triton is not None
    names = args.variants.split(",") if args.variants else (["unfused", "onepass"] if fast else ["unfused"])
    bad = [n for n in names if n not in VARIANTS or (n != "unfused" and not fast)]
    if bad:
        raise SystemExit(f"--variants {bad} unusable here (fused needs CUDA + triton); valid: {list(VARIANTS)}")
    if "onepass-tuned" in names and not args.kernel_sweep:
        raise SystemExit("--variants onepass-tuned needs --kernel-sweep B (it takes the fastest swept config)")
    return names
