"""CUDA-graph replay of readout calls, for batch-1 latency.

At batch 1 a ViT-L forward is launch-bound: each of its ~700 kernels costs more CPU time to launch than
GPU time to run, and DoLa adds ~40 launches (the hooks' Triton kernels, the head tail). Capturing one
whole readout call as a CUDA graph lets later calls replay every kernel without the CPU.

    graphed = capture(readout, example_images, layers=[18, 20, 22])   # under the autocast you will run with
    z_final, z_layers = graphed(images)                               # same shape, dtype, device, autocast

The model is not changed: the capture is one ordinary readout call (its temporary hooks are removed
in ``finally`` as always) whose kernels the graph records. Limits, as for any CUDA graph, checked on
every call: a fixed input shape, dtype and device, fixed layers, the autocast state of the capture.
The graph reads the weights from the memory they had at capture, and replays the tensors the readout
derived from them then (the folded head, the entry norms): after any weight change, capture again.
:class:`GraphCache` does so by itself: its key holds ``Readout.derived_key()``. Results are fresh tensors,
copied out of the graph's buffers, so a later replay never overwrites a result you hold.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from siglip_dola.readout.call_state import graph_mode


def _autocast_state(device: torch.device) -> tuple:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


@dataclass
class GraphedCall:
    """A captured ``fn(images)``; call it with images like the example: -> fn's outputs (copies)."""

    graph: torch.cuda.CUDAGraph
    static_images: torch.Tensor
    static_outputs: tuple
    autocast: tuple

    def __call__(self, images: torch.Tensor):
        """images: the example's shape, dtype and device -> the captured function's outputs, replayed."""
        expected = self.static_images
        if not isinstance(images, torch.Tensor) or (images.shape, images.dtype, images.device) != (
                expected.shape, expected.dtype, expected.device):
            got = (tuple(images.shape), images.dtype, images.device) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must match the captured example: shape {tuple(expected.shape)}, dtype "
                             f"{expected.dtype}, device {expected.device}; got {got} (capture again for others)")
        if _autocast_state(expected.device) != self.autocast:
            raise ValueError(f"autocast (enabled, dtype) must be {self.autocast} as at capture, got "
                             f"{_autocast_state(expected.device)}")
        expected.copy_(images)
        self.graph.replay()
        outputs = tuple(out.clone() for out in self.static_outputs)
        return outputs[0] if len(outputs) == 1 else outputs


def capture_call(fn: Callable, example_images: torch.Tensor, warmup: int = 2) -> GraphedCall:
    """Capture ``fn(images)`` -> tensor or tuple of tensors as a CUDA graph (after ``warmup`` plain calls)."""
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (Triton kernels compile and caches fill then), got {warmup!r}")
    if not isinstance(example_images, torch.Tensor) or not example_images.is_cuda:
        where = example_images.device if isinstance(example_images, torch.Tensor) else type(example_images).__name__
        raise ValueError(f"example_images must be a CUDA tensor (CUDA graphs need a GPU), got {where}")
    device = example_images.device
    state = _autocast_state(device)
    # the caller's autocast, without its weight-cast cache: cached casts live outside the graph and are freed
    # when the caller's autocast region ends, so the graph must record its own casts (PyTorch's CUDA-graph notes)
    no_cache = lambda: torch.autocast(device.type, dtype=state[1], enabled=state[0], cache_enabled=False)  # noqa: E731
    with torch.inference_mode(False):   # a normal tensor: replays may copy into it inside or outside inference mode
        static_images = example_images.detach().clone()
    side = torch.cuda.Stream(device)   # warm-up on a side stream, as torch.cuda.graph's documentation asks
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad(), no_cache(), torch.cuda.stream(side), graph_mode():   # the capture's paths, prepared
        for _ in range(warmup):
            fn(static_images)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), no_cache(), graph_mode(), torch.cuda.graph(graph):
            outputs = fn(static_images)
    except RuntimeError as error:   # e.g. a host sync inside the model's forward
        raise RuntimeError(f"this call cannot be captured as a CUDA graph ({error}); use the plain readout") from error
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return GraphedCall(graph, static_images, outputs, state)


# SigLIP2 NaFlex reads each image's patch grid on the host (the model resizes its position embeddings per grid),
# so its forward syncs and a capture would fail midway (cudaErrorStreamCaptureInvalidated)
NAFLEX_NOT_CAPTURABLE = ("CUDA graphs are not available for SigLIP2 NaFlex towers: the model reads each image's "
                         "patch grid on the host; use cuda_graphs=False (the plain readout)")


def check_capturable(readout) -> None:
    """ValueError, before any capture starts, for a readout whose forward cannot be captured (NaFlex)."""
    if getattr(readout, "packed_inputs", False):
        raise ValueError(NAFLEX_NOT_CAPTURABLE)


def capture(readout, example_images: torch.Tensor, layers=None, warmup: int = 2) -> GraphedCall:
    """A graphed ``readout(images, layers)``: call it -> (z_final (B, D), z_layers (J, B, D)), like the readout."""
    check_capturable(readout)
    readout.prepare_inputs(example_images, {})   # checks the images
    layer_list = readout.check_layers(layers)   # validated once, here: the graph fixes them
    return capture_call(lambda images: readout(images, layer_list), example_images, warmup)


class CallCache:
    """``cache(fn, images, key)`` = ``fn(images)`` replayed from a graph captured per (key, shape, dtype, device,
    autocast); ``fn`` is captured on the first call of each key (it must depend on nothing but ``images`` and what
    ``key`` names); the ``size`` most recently used graphs are kept (each holds its own memory)."""

    def __init__(self, size: int = 4):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.size, self._calls = size, OrderedDict()

    def __len__(self) -> int:
        return len(self._calls)

    def __call__(self, fn: Callable, images: torch.Tensor, key=()):
        full_key = (key, tuple(images.shape), images.dtype, images.device, _autocast_state(images.device))
        call = self._calls.pop(full_key, None) or capture_call(fn, images)
        self._calls[full_key] = call                              # most recently used last
        while len(self._calls) > self.size:
            self._calls.popitem(last=False)
        return call(images)


class GraphCache:
    """``cache(images, layers)`` = ``readout(images, layers)`` replayed from graphs captured per (shape, dtype,
    device, layers, autocast); the ``size`` most recently used graphs are kept (each holds its own memory)."""

    def __init__(self, readout, size: int = 4):
        self.readout, self._cache = readout, CallCache(size)

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(self, images: torch.Tensor, layers=None):
        """images (B, C, H, W) on CUDA -> (z_final (B, D), z_layers (J, B, D)); captures on a new key."""
        layer_list = self.readout.check_layers(layers)
        self.readout.check_images(images)
        key = (tuple(layer_list), self.readout.derived_key())   # new weights: capture again
        return self._cache(lambda x: self.readout(x, layer_list), images, key=key)
