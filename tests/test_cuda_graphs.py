"""readout/cuda_graphs.py on CPU: argument checks and the replay wrapper's contract (copy in, replay, copy out).

The capture itself needs a GPU: benchmarks/gpu_check.py compares graph replays with plain readout calls
at ViT-L/16-384 size on CUDA (fp32 and bf16) and checks the model is left unchanged.
"""
import pytest
import torch

from siglip_dola.readout import cuda_graphs


class DoublingGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() recomputes the 'captured' outputs from the static input."""

    def __init__(self, static_images, outputs):
        self.static_images, self.outputs, self.replays = static_images, outputs, 0

    def replay(self):
        self.replays += 1
        self.outputs[0].copy_(self.static_images * 2)


def graphed_call(shape=(2, 3)):
    static_images = torch.zeros(shape)
    outputs = (torch.zeros(shape),)
    graph = DoublingGraph(static_images, outputs)
    state = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    return cuda_graphs.GraphedCall(graph, static_images, outputs, state), graph


def test_capture_needs_a_cuda_example():
    with pytest.raises(ValueError, match="example_images must be a CUDA tensor"):
        cuda_graphs.capture_call(lambda x: x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="example_images must be a CUDA tensor"):
        cuda_graphs.capture_call(lambda x: x, [1.0, 2.0])


@pytest.mark.parametrize("warmup", [0, 1.5, True])
def test_capture_refuses_a_bad_warmup(warmup):
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        cuda_graphs.capture_call(lambda x: x, torch.zeros(2, 3), warmup=warmup)


def test_replay_copies_the_images_in_and_the_outputs_out():
    call, graph = graphed_call()
    first = call(torch.ones(2, 3))
    second = call(torch.full((2, 3), 5.0))
    assert graph.replays == 2
    assert torch.equal(first, torch.full((2, 3), 2.0))       # not overwritten by the second replay
    assert torch.equal(second, torch.full((2, 3), 10.0))


@pytest.mark.parametrize("images", [torch.ones(3, 3), torch.ones(2, 3, dtype=torch.float64), [[1.0] * 3] * 2])
def test_replay_refuses_images_unlike_the_example(images):
    call, graph = graphed_call()
    with pytest.raises(ValueError, match=r"images must match the captured example: shape \(2, 3\)"):
        call(images)
    assert graph.replays == 0


def test_replay_refuses_another_autocast_state():
    call, graph = graphed_call()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="autocast"):
        call(torch.ones(2, 3))
    assert graph.replays == 0


class _FakeReadout:
    """Stands in for a Readout: records calls, validates like one (the cache validates before its lookup)."""

    def check_layers(self, layers):
        return list(layers)

    def check_images(self, images):
        assert images.ndim == 4

    def derived_key(self):
        return ()

    def __call__(self, images, layers):
        return ("replayed", tuple(images.shape), tuple(layers))


def test_graph_cache_captures_once_per_key_and_keeps_the_most_recent(monkeypatch):
    captured = []

    def fake_capture_call(fn, images):
        captured.append(fn(images)[1:])
        return fn

    monkeypatch.setattr(cuda_graphs, "capture_call", fake_capture_call)
    cache = cuda_graphs.GraphCache(readout=_FakeReadout(), size=2)
    a, b, c = torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)
    assert cache(a, [2]) == ("replayed", (1, 3, 4, 4), (2,))
    cache(a, [2]), cache(b, [2]), cache(a, [2])          # hits: a, a; new: b
    assert captured == [((1, 3, 4, 4), (2,)), ((2, 3, 4, 4), (2,))]
    cache(a, [4])                                        # other layers: a new graph; evicts b (least recent)
    cache(c, [2])                                        # evicts a/[2]
    cache(b, [2])                                        # b was evicted: captured again
    assert captured[2:] == [((1, 3, 4, 4), (4,)), ((3, 3, 4, 4), (2,)), ((2, 3, 4, 4), (2,))]
    cache(c, [2]), cache(b, [2])                         # both most recent graphs are held: no capture
    assert len(captured) == 5
    cache(a, [4])                                        # evicted by c/[2] (size 2): captured again
    assert captured[5:] == [((1, 3, 4, 4), (4,))]


@pytest.mark.parametrize("size", [0, 2.0, True])
def test_graph_cache_refuses_a_bad_size(size):
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        cuda_graphs.GraphCache(readout=object(), size=size)
