"""Tests for siglip_dola.readout: the model is never changed (even when a call raises), and bad input is refused."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import SiglipVisionModel

from siglip_dola.readout import from_model
from test_readout import CASES, DEPTH, SIZE, _hf_vision_config, _images, _rel_err, _timm_vit, reference

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    """Everything the readout must leave as it was: weights (bitwise), hooks, flags, requires_grad."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {name: tuple(len(getattr(m, attr, {})) for attr in HOOK_DICTS) for name, m in model.named_modules()},
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks)),
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert value.dtype == after["state"][key].dtype and torch.equal(value, after["state"][key]), key
    for field in ("hooks", "global_hooks", "training", "requires_grad"):
        assert before[field] == after[field], field


def _mixed_state(case):
    """Train mode on the model, eval on one block, one frozen parameter: flags the readout must keep."""
    case.model.train()
    case.blocks[1].eval()
    next(case.blocks[0].parameters()).requires_grad_(False)
    return case


@pytest.mark.parametrize("name", ["timm", "janus_lm", "open_clip", "hf_vision"])
def test_calls_leave_the_model_unchanged(name):
    case = _mixed_state(CASES[name]())
    images = _images()
    with torch.no_grad():
        own_before = case.embed(images)
    before = snapshot(case.model)
    readout = from_model(case.model)
    readout(images, layers=[1, 2, 3])
    readout(images, layers=[])
    assert_unchanged(before, case.model)
    with torch.no_grad():
        assert torch.equal(case.embed(images), own_before)


@pytest.mark.parametrize("name", ["timm", "hf_vision"])
def test_a_call_that_raises_mid_forward_leaves_the_model_unchanged(name):
    case = CASES[name]()
    images = _images()
    readout = from_model(case.model)
    before = snapshot(case.model)

    def explode(module, args, output):
        raise RuntimeError("boom in block 3")
    handle = case.blocks[2].register_forward_hook(explode)   # the test's own hook, after ours on blocks 1-2 ran
    try:
        with pytest.raises(RuntimeError, match="boom"):
            readout(images, layers=[1, 2, 3])
    finally:
        handle.remove()
    assert_unchanged(before, case.model)
    expected_final, expected = reference(case, images)       # and the readout still works afterwards
    z_final, z_layers = readout(images, layers=[2])
    assert _rel_err(z_final, expected_final) <= 1e-6 and _rel_err(z_layers[0], expected[2]) <= 1e-5


@pytest.mark.parametrize("layers, error", [
    ([0], ValueError), ([DEPTH], ValueError), ([-1], ValueError), ([1, 7], ValueError),
    ([1.5], TypeError), ([True], TypeError), (["2"], TypeError), (2, TypeError),
])
def test_bad_layers_name_the_valid_range(layers, error):
    readout = from_model(_timm_vit())
    with pytest.raises(error, match=f"1..{DEPTH - 1}"):
        readout(_images(), layers=layers)


def test_duplicate_layers_are_refused():
    with pytest.raises(ValueError, match="duplicates"):
        from_model(_timm_vit())(_images(), layers=[2, 2])


@pytest.mark.parametrize("images, error", [
    (torch.zeros(3, SIZE, SIZE), ValueError), (torch.zeros(1, 3, SIZE, SIZE + 8), ValueError),
    (torch.zeros(1, 4, SIZE, SIZE), ValueError), (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), TypeError),
    (np.zeros((1, 3, SIZE, SIZE), dtype=np.float32), TypeError),
])
@pytest.mark.parametrize("name", ["timm", "hf_vision"])
def test_bad_images_say_what_size_the_model_expects(images, error, name):
    readout = from_model(CASES[name]().model)
    with pytest.raises(error, match=rf"\[B, 3, {SIZE}, {SIZE}\]"):
        readout(images, layers=[1])


@pytest.mark.parametrize("model", [
    nn.Linear(4, 4), _timm_vit(global_pool=""),      # no pooling: tokens out (avg / token pools are supported)
    pytest.param(SiglipVisionModel(_hf_vision_config().__class__(**{**_hf_vision_config().to_dict(),
                                                                     "vision_use_head": False})),
                 marks=pytest.mark.skipif(not hasattr(_hf_vision_config(), "vision_use_head"),
                                          reason="this transformers' SiglipVisionConfig has no vision_use_head: "
                                                 "every SiglipVisionModel has its head")),
], ids=["linear", "timm_no_pool", "hf_without_head"])
def test_unsupported_models_list_what_is_supported(model):
    with pytest.raises(ValueError, match="supported: timm VisionTransformer with a MAP head.*Hugging Face"):
        from_model(model)


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="supported"):
        from_model("vit_large_patch16_siglip_384")
