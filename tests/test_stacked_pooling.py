"""The "fused-stacked" path of readout/layer_pooler.py: at small batches every layer is held and pooled in ONE kernel
launch after the forward. In Triton's CPU interpreter (a subprocess, stacking switched on for CPU) against the model's
own norm + head in float64; the fall-back, the in-place check and the knob without it (a stand-in kernel)."""
import textwrap
import types

import pytest
import torch

from interpreter import run_interpreted
from siglip_dola import config
from siglip_dola.readout import call_state, layer_pooler
from siglip_dola.readout.pooler import Pooling
from test_pooler import deep_tower, fake_kernel, folded_head, own_head, tokens_like_a_block

STACKED_CHECK = textwrap.dedent("""
    import copy, json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_pooler import DIM, deep_tower, folded_head, own_head, trained_like_norms
    from siglip_dola import config
    from siglip_dola.readout import from_model, layer_pooler
    rel = lambda got, ref: float((got.double() - ref).norm() / ref.norm())
    STACK = {"stacked_max_batch": 8, "stacked_on_cpu": True, "target_programs": 4}
    errors, paths = {}, {}
    tower = deep_tower(seed=8, depth=4)
    trained_like_norms(tower)                       # random affines in every LayerNorm (init leaves 1, 0)
    folded, reference = folded_head(tower), copy.deepcopy(tower).double()
    state = {k: v.clone() for k, v in tower.state_dict().items()}
    readout = from_model(tower)

    def hooks_left():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tower.modules())

    def read(images, layers, **options):   # the readout under autocast, and each block output it pooled
        captured, handles = {}, [tower.blocks[j - 1].register_forward_hook(
            lambda m, a, o, j=j: captured.__setitem__(j, o.detach().clone())) for j in layers]
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), config.override(**options):
                _, z_layers = readout(images, layers)
        finally:
            for handle in handles:
                handle.remove()
        return z_layers, torch.stack([own_head(reference, captured[j].double()) for j in layers])

    for batch in (1, 2):
        images = torch.randn(batch, 3, 32, 32)
        for layers in ([2], [1, 2, 3]):
            key = f"b{batch}/j{len(layers)}"
            z_layers, expected = read(images, layers, **STACK)
            errors["readout/" + key], paths["readout/" + key] = rel(z_layers, expected), readout.layer_paths
            # the pooler alone, fp16 block outputs, fp32 tail: only the kernel's fp16 products differ
            tokens = [torch.randn(batch, 17, DIM).half() * 2 + 0.5 for _ in layers]
            with torch.no_grad(), config.override(**STACK):
                pooler = layer_pooler.LayerPooler(folded, layers)
                for layer, layer_tokens in zip(layers, tokens):
                    for module, hook in pooler.hooks(layer, tower.blocks):
                        hook(module, (), layer_tokens)
                z_layers = pooler.result()
            expected = torch.stack([own_head(reference, t.double()) for t in tokens])
            errors["pooler/" + key], paths["pooler/" + key] = rel(z_layers, expected), pooler.paths
    images = torch.randn(2, 3, 32, 32)
    stacked, _ = read(images, [1, 2, 3], **STACK)
    for name, options in {"knob_below_batch": {**STACK, "stacked_max_batch": 1}, "knob_off": {
            **STACK, "stacked_max_batch": 0}, "default_off": {"target_programs": 4}}.items():
        per_layer, expected = read(images, [1, 2, 3], **options)
        paths[name] = readout.layer_paths
        errors[name] = rel(per_layer, expected)
    errors["stacked_vs_per_layer"] = rel(stacked, per_layer.double())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), config.override(**STACK):
        _, z_inference = readout(images, [1, 2, 3])   # no version counters: timm Blocks do not write their input
    paths["inference_mode"] = readout.layer_paths
    errors["inference_mode"] = rel(z_inference, stacked.double())
    paths["hooks_left/normal"] = hooks_left()
    failures = {}
    for name, module, hook in [("in_place", tower.blocks[2], lambda m, args: args[0].add_(1.0)),   # block 2's output
                               ("raises", tower.blocks[3], lambda m, args: 1 / 0)]:
        handle = module.register_forward_pre_hook(hook)
        try:
            read(images, [1, 2, 3], **STACK)
        except (RuntimeError, ZeroDivisionError) as error:
            failures[name] = f"{type(error).__name__}: {error}"
        finally:
            handle.remove()
        paths["hooks_left/" + name] = hooks_left()
    paths["unchanged"] = all(torch.equal(state[k], v) for k, v in tower.state_dict().items())
    print(json.dumps({"errors": errors, "paths": paths, "failures": failures}))
""")


def test_stacked_pooling_in_interpreter_matches_the_models_own_head():
    result = run_interpreted(STACKED_CHECK)
    paths, errors, failures = result["paths"], result["errors"], result["failures"]
    for batch in (1, 2):
        for layers in ([2], [1, 2, 3]):
            key = f"b{batch}/j{len(layers)}"
            assert paths["readout/" + key] == paths["pooler/" + key] == {str(j): "fused-stacked" for j in layers}
            assert errors["pooler/" + key] < 2e-3, (key, errors)    # fp16 products, fp32 accumulation and tail
    entry = {str(j): "fused-entry-norm" for j in (1, 2, 3)}
    assert paths["knob_below_batch"] == paths["knob_off"] == paths["default_off"] == entry
    assert paths["inference_mode"] == {str(j): "fused-stacked" for j in (1, 2, 3)}
    for name, error in errors.items():
        assert error == error and error < 2e-2, (name, error)   # NaN fails; the readout's tail runs in bf16 here
    assert failures["in_place"].startswith("RuntimeError: the block after layer 2 modified that layer's output in "
                                           "place"), failures
    assert failures["raises"].startswith("ZeroDivisionError"), failures
    assert paths["hooks_left/normal"] == paths["hooks_left/in_place"] == paths["hooks_left/raises"] == 0
    assert paths["unchanged"] is True


# ---------------------------------------------------------------- without the interpreter: a stand-in kernel
def _stacking_pooler(monkeypatch, fits: int, calls: list, layers=(1, 2)):
    monkeypatch.setattr(layer_pooler, "pool_partials", fake_kernel(fits, calls))
    monkeypatch.setattr(layer_pooler, "triton_usable", lambda tokens, probe: True)
    tower = deep_tower(seed=3)
    with config.override(num_stages=3, target_programs=4, stacked_max_batch=8, stacked_on_cpu=True):
        return tower, layer_pooler.LayerPooler(folded_head(tower), list(layers))


def _run_hooks(pooler, tower, tokens):
    for layer, layer_tokens in zip(pooler.layers, tokens):
        hooks = pooler.hooks(layer, tower.blocks)
        assert len(hooks) == 1            # the block's hook only: no entry norm was prepared here
        module, hook = hooks[0]
        hook(module, (), layer_tokens)


@pytest.mark.parametrize("fits,first_calls,second_calls,path", [(2, [3, 2], [2], "fused-stacked"),
                                                                (0, [3, 2, 1], [], "pytorch")])
def test_stacked_launch_uses_fewer_stages_or_pytorch_when_shared_memory_is_short(monkeypatch, caplog, fits,
                                                                               first_calls, second_calls, path):
    monkeypatch.setattr(layer_pooler, "_FITTING_STAGES", {})
    monkeypatch.setattr(call_state, "_LOGGED", set())   # log-once state of this process: other tests log it too
    caplog.set_level("INFO", logger="siglip_dola.readout")
    calls = []
    tokens = [tokens_like_a_block(seed=s) for s in (4, 5)]
    for expected_calls in (first_calls, first_calls + second_calls):   # a second call reuses what fitted
        tower, pooler = _stacking_pooler(monkeypatch, fits, calls)
        with torch.no_grad():
            _run_hooks(pooler, tower, tokens)
            z_layers = pooler.result()
            expected = torch.stack([own_head(tower, layer_tokens) for layer_tokens in tokens])
        torch.testing.assert_close(z_layers, expected, rtol=1e-4, atol=1e-5)
        assert calls == expected_calls          # ONE launch per call for both layers (and its retries)
        assert pooler.paths == {1: path, 2: path}
    fallbacks = [r for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(fallbacks) == (1 if fits == 0 else 0)   # the fall-back to PyTorch is logged once, with its reason


def test_a_held_output_modified_in_place_before_the_stacked_launch_is_refused(monkeypatch):
    monkeypatch.setattr(layer_pooler, "_FITTING_STAGES", {})
    tower, pooler = _stacking_pooler(monkeypatch, 3, [])
    tokens = [tokens_like_a_block(seed=s) for s in (4, 5)]
    _run_hooks(pooler, tower, tokens)
    tokens[0].add_(1.0)
    with pytest.raises(RuntimeError, match="layer 1 modified that layer's output in place.*stacked_max_batch=0"):
        pooler.result()


@pytest.mark.parametrize("batch,graphed_limit,path", [(1, 1, "fused-stacked"), (2, 1, "fused-stats"),
                                                      (1, 0, "fused-stats")])
def test_a_cuda_graph_capture_uses_its_own_batch_limit(monkeypatch, batch, graphed_limit, path):
    monkeypatch.setattr(layer_pooler, "_FITTING_STAGES", {})
    monkeypatch.setattr(layer_pooler, "capturing", lambda tokens: True)   # as inside torch.cuda.graph(...)
    tower, pooler = _stacking_pooler(monkeypatch, 3, [])
    with config.override(target_programs=4, stacked_max_batch=8, stacked_on_cpu=True,
                         stacked_max_batch_graphed=graphed_limit):
        pooler = layer_pooler.LayerPooler(pooler.folded, pooler.layers)
    _run_hooks(pooler, tower, [tokens_like_a_block(seed=s)[:batch] for s in (4, 5)])
    pooler.result()
    assert pooler.paths == {1: path, 2: path}   # eager, stacked_max_batch=8 would stack every case


@pytest.mark.parametrize("stacked_max_batch,prepared", [(8, [1]), (0, [1, 2, 3])])
def test_entry_norms_are_prepared_only_for_layers_pooled_one_by_one(monkeypatch, stacked_max_batch, prepared):
    monkeypatch.setattr(layer_pooler, "_FITTING_STAGES", {})
    tower, pooler = _stacking_pooler(monkeypatch, 3, [], layers=(1, 2, 3))
    calls = []

    def entry(layer):   # what Pooling.entry returns where block j+1's norm is not usable
        calls.append(layer)
        return None, "no usable norm here"
    with config.override(target_programs=4, stacked_max_batch=stacked_max_batch, stacked_on_cpu=True):
        pooler = layer_pooler.LayerPooler(pooler.folded, pooler.layers, entries=entry)
    _run_hooks(pooler, tower, [tokens_like_a_block(seed=s) for s in (4, 5, 6)])
    pooler.result()
    assert calls == prepared   # the first layer's hooks are asked for before stacking is decided


def test_without_version_counters_only_known_blocks_are_held(monkeypatch):
    monkeypatch.setattr(layer_pooler, "_FITTING_STAGES", {})
    tower, pooler = _stacking_pooler(monkeypatch, 3, [], layers=(1,))
    with torch.inference_mode():
        tokens = tokens_like_a_block(seed=4)
        block_hook = pooler.hooks(1, tower.blocks)[0][1]
        block_hook(torch.nn.Identity(), (), tokens)   # a block type that might write its input later
        pooler.result()
    assert pooler.paths == {1: "fused-stats"}


def test_the_stacking_knobs_fail_loudly():
    launch = config.pooling_launch()
    assert (launch["stacked_max_batch"], launch["stacked_max_batch_graphed"], launch["stacked_on_cpu"]) == (8, 1, False)
    for options, match in [({"stacked_max_batch": -1}, "must be an int >= 0"),
                           ({"stacked_max_batch_graphed": -1}, "must be an int >= 0"),
                           ({"stacked_max_batch": True}, "must be an int"),
                           ({"stacked_on_cpu": 1}, "must be True or False")]:
        with pytest.raises(ValueError, match=match):
            config.set(**options)
    with config.override(stacked_max_batch=0, stacked_on_cpu=True):
        assert config.pooling_launch()["stacked_max_batch"] == 0 and config.pooling_launch()["stacked_on_cpu"]
    assert config.pooling_launch()["stacked_max_batch"] == 8


def test_graph_mode_marks_cuda_calls_as_captured_until_it_ends():
    cuda_tokens = types.SimpleNamespace(is_cuda=True)   # capturing() reads only the device flag inside graph_mode
    with pytest.raises(ZeroDivisionError):
        with call_state.graph_mode():
            assert call_state.capturing(cuda_tokens) and not call_state.capturing(torch.zeros(1))
            1 / 0
    assert call_state._GRAPHING == []   # left even after an error


def test_inside_a_capture_entry_norms_come_only_from_the_cache():
    tower = deep_tower(seed=3)
    head = folded_head(tower)
    pooling = Pooling(tower.blocks, None)
    entry, reason = pooling.entry(1, head, cached_only=True)   # not prepared: preparing reads the host
    assert entry is None and "not prepared before this CUDA graph capture" in reason
    prepared, _ = pooling.entry(1, head)
    assert prepared is not None and pooling.entry(1, head, cached_only=True)[0] is prepared
