"""Random LayerNorm affines for random-init models that stand in for trained ones.

Random init leaves every LayerNorm at gamma = 1, beta = 0, which trained weights never have and which hides
shift/scale bugs in a readout (e.g. a norm applied twice, or beta dropped), so every benchmark sets them first.
"""
from __future__ import annotations

import torch


def randomize_norms(model: torch.nn.Module, trained_like: bool = False, seed: int = 1) -> None:
    """Every LayerNorm of `model` a random affine, in place.

    Default: |gamma| in [0.3, 1.5] with 20% negative, beta ~ N(0, 0.5) (wide, to expose bugs). trained_like: gamma ~
    N(0.8, 0.7), beta ~ N(0, 0.2), closer to released checkpoints (for timing the paths that check precision guards).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                shape = module.weight.shape
                if trained_like:
                    gamma = torch.randn(shape, generator=generator) * 0.7 + 0.8
                    beta = torch.randn(shape, generator=generator) * 0.2
                else:
                    sign = torch.where(torch.rand(shape, generator=generator) < 0.2, -1.0, 1.0)
                    gamma = (torch.rand(shape, generator=generator) * 1.2 + 0.3) * sign
                    beta = torch.randn(shape, generator=generator) * 0.5
                module.weight.copy_(gamma)
                if module.bias is not None:
                    module.bias.copy_(beta)
