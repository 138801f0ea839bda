"""What each backend adapter hands to `siglip_dola.loading`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class AdapterParts:
    preprocess: Callable                                   # PIL.Image -> FloatTensor [3, H, W]
    encode_text: Callable[[list[str]], torch.Tensor] | None  # texts -> [C, D] raw, on the model's device
    logit_scale: float                                     # log space, as stored
    logit_bias: float
