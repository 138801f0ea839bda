"""What each model family's adapter hands to `siglip_dola.loading` (loading/families.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Loaded:
    """A model loaded by name or path: the module, its preprocess and tokenizer, its id, its weight files."""
    model: torch.nn.Module
    preprocess: Callable | None
    tokenizer: object
    model_id: str
    weights: list[Path]


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder (what the fingerprint of a loaded model hashes)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)


@dataclass
class AdapterParts:
    preprocess: Callable                                   # PIL.Image -> FloatTensor [3, H, W]
    encode_text: Callable[[list[str]], torch.Tensor] | None  # texts -> [C, D] raw, on the model's device
    logit_scale: float                                     # log space, as stored
    logit_bias: float
