"""What one readout call knows about itself: the path names it records, why it falls back (logged once per
process), whether the Triton kernel may run, and whether a CUDA graph is being captured (or warmed up).

Shared by the layer poolers (layer_pooler.py, pooler.py) and cuda_graphs.py, which marks its warm-ups and
capture with :func:`graph_mode` so they take the same pooling paths.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from siglip_dola import config
from siglip_dola.readout.kernel import triton

LOG = logging.getLogger("siglip_dola.readout")
PATHS = ("fused-entry-norm", "fused-stats", "fused-stacked", "pytorch", "model-head")
_LOGGED: set = set()


def log_once(reason: str, level: int = logging.WARNING) -> None:
    """Log ``reason`` the first time it occurs in this process."""
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        LOG.log(level, "siglip_dola readout: %s", reason)


def missing_error(missing: list[int]) -> RuntimeError:
    return RuntimeError(f"blocks {missing} never ran during the forward (a compiled or scripted model "
                        "does not call hooks); pass the eager model")


_GRAPHING: list[bool] = []   # non-empty inside graph_mode(): cuda_graphs' warm-up and capture


@contextlib.contextmanager
def graph_mode():
    """Calls inside are being captured as a CUDA graph, or warm it up: they take the capture's paths, so the
    warm-up prepares (with its host reads) what the capture then uses."""
    _GRAPHING.append(True)
    try:
        yield
    finally:
        _GRAPHING.pop()


def stream_capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device` (never on CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def capturing(tokens: torch.Tensor) -> bool:
    """Whether a CUDA graph is captured (or warmed up, graph_mode) on the tokens' device: stacking has its own
    batch limit there."""
    return tokens.is_cuda and (bool(_GRAPHING) or stream_capturing(tokens.device))


def block_tokens(output) -> torch.Tensor:
    """A block hook's output -> its tokens (B, T, D)."""
    return output[0] if isinstance(output, (tuple, list)) else output   # HF 4.x layers return a tuple


def fused_possible(head, device: torch.device) -> tuple[bool, str | None]:
    """(whether the Triton kernel may pool this call, the reason it may not)."""
    if not config.use_fused_pooling():
        return False, "fused pooling is off (siglip_dola.config fused_pooling=False)"
    if device.type != "cuda" and not config.triton_interpreted():
        return False, f"tokens on {device.type}: the Triton kernel runs on CUDA only"
    if triton is None:
        return False, "triton is not installed (pip install triton)"
    if head.key_probe.dtype != torch.float32:
        return False, f"the folded head is {head.key_probe.dtype} (the kernel serves float32 heads)"
    return True, None
