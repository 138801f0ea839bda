"""Tests for siglip_dola.scoring.fused_scoring (runtime.score(..., fused=True)): the compiled path equals the eager one.

The eager runtime.score is checked against scipy in test_runtime.py; here the torch.compile'd path is checked
against it (and once against a scipy reference directly) on ONE tiny shape, so the inductor compiles stay few.
"""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax

from siglip_dola import scoring as rt

B, D, C, TAU = 4, 16, 10, 0.07
LAYERS = {1: [20], 3: [18, 20, 22]}
FIELDS = ("probs", "log_probs", "final_probs", "premature_layer", "jsd")


def inputs(num_layers: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    z_final = torch.randn(B, D, generator=generator)
    z_layers = z_final + 0.8 * torch.randn(num_layers, B, D, generator=generator)  # near q_N, as real layers
    bank = torch.randn(C, D, generator=generator)
    return z_final.to(dtype), z_layers.to(dtype), bank.to(dtype)


def assert_same(fused, eager, atol=2e-6):
    for name in FIELDS:
        got, want = getattr(fused, name), getattr(eager, name)
        assert type(got) is type(want), name
        got, want = torch.as_tensor(got), torch.as_tensor(want)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), name  # same masked classes
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["dynamic", "static", "off"])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_fused_equals_eager_every_mode(mode, num_layers):
    z_final, z_layers, bank = inputs(num_layers, seed=num_layers)
    kwargs = dict(mode=mode, static_layer=LAYERS[num_layers][-1])
    eager = rt.score(z_final, z_layers, bank, TAU, LAYERS[num_layers], **kwargs)
    fused = rt.score(z_final, z_layers, bank, TAU, LAYERS[num_layers], **kwargs, fused=True)
    assert_same(fused, eager)
    if mode != "off":
        assert (fused.probs == 0).any(), "the head mask should drop some classes at this temperature"


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fused_equals_eager_bf16_inputs(mode):
    z_final, z_layers, bank = inputs(3, torch.bfloat16, seed=5)
    eager = rt.score(z_final, z_layers, bank, TAU, LAYERS[3], mode=mode, static_layer=18)
    fused = rt.score(z_final, z_layers, bank, TAU, LAYERS[3], mode=mode, static_layer=18, fused=True)
    assert fused.probs.dtype == torch.float32
    assert_same(fused, eager)


def test_fused_dynamic_matches_scipy_reference():
    z_final, z_layers, bank = inputs(3, seed=7)
    fused = rt.score(z_final, z_layers, bank, TAU, LAYERS[3], fused=True)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float64)  # noqa: E731
    q_final = softmax(unit(z_final.numpy()) @ unit(bank.numpy()).T / TAU, axis=-1)  # (B, C)
    q_layers = softmax(unit(z_layers.numpy()) @ unit(bank.numpy()).T / TAU, axis=-1)  # (J, B, C)
    table = jensenshannon(q_final[None], q_layers, axis=-1) ** 2  # (J, B)
    np.testing.assert_allclose(fused.jsd.numpy(), table, atol=1e-5)
    for b in range(B):
        best = int(np.argmax(table[:, b]))
        assert fused.premature_layer[b].item() == LAYERS[3][best]
        keep = q_final[b] >= 0.1 * q_final[b].max()
        expected = np.zeros(C)
        expected[keep] = softmax(np.log(q_final[b, keep] / q_layers[best, b, keep]))
        np.testing.assert_allclose(fused.probs[b].numpy(), expected, atol=1e-5)


def test_fused_ties_go_to_the_earliest_layer():
    z_final, z_layers, bank = inputs(3, seed=3)
    z_layers = z_layers[1:2].expand(3, B, D).clone()  # three identical layers: exact JSD ties
    fused = rt.score(z_final, z_layers, bank, TAU, LAYERS[3], fused=True)
    assert fused.premature_layer.tolist() == [18] * B
    assert_same(fused, rt.score(z_final, z_layers, bank, TAU, LAYERS[3]))


def test_fused_official_compat_and_off_without_layers():
    z_final, z_layers, bank = inputs(3, seed=11)
    official = dict(compat="official-dola")
    assert_same(rt.score(z_final, z_layers, bank, TAU, LAYERS[3], **official, fused=True),
                rt.score(z_final, z_layers, bank, TAU, LAYERS[3], **official))
    fused = rt.score(z_final, None, bank, TAU, None, mode="off", fused=True)
    assert_same(fused, rt.score(z_final, None, bank, TAU, None, mode="off"))
    assert fused.premature_layer.tolist() == [-1] * B and fused.jsd.shape == (0, B)


def test_fused_numpy_in_numpy_out():
    z_final, z_layers, bank = inputs(3, seed=0)
    fused = rt.score(z_final.numpy(), z_layers.numpy(), bank.numpy(), TAU, LAYERS[3], fused=True)
    assert isinstance(fused.probs, np.ndarray) and fused.premature_layer.dtype == np.int64
    assert_same(fused, rt.score(z_final.numpy(), z_layers.numpy(), bank.numpy(), TAU, LAYERS[3]))


@pytest.mark.parametrize("argument", ["z_final", "z_layers", "text_bank"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fused_nan_raises_the_same_value_error(argument, bad):
    z_final, z_layers, bank = inputs(3, seed=0)
    given = dict(z_final=z_final, z_layers=z_layers, text_bank=bank)
    given[argument] = given[argument].clone()
    given[argument].view(-1)[3] = bad
    args = (given["z_final"], given["z_layers"], given["text_bank"], TAU, LAYERS[3])
    with pytest.raises(ValueError) as eager_error:
        rt.score(*args)
    with pytest.raises(ValueError, match=f"^{argument} must be finite") as fused_error:
        rt.score(*args, fused=True)
    assert str(fused_error.value) == str(eager_error.value)


def test_fused_switch_must_be_bool_and_metadata_checks_stay():
    z_final, z_layers, bank = inputs(3, seed=0)
    with pytest.raises(TypeError, match="fused must be True or False"):
        rt.score(z_final, z_layers, bank, TAU, LAYERS[3], fused="yes")
    with pytest.raises(ValueError, match="static_layer=4 must be one of layers"):
        rt.score(z_final, z_layers, bank, TAU, LAYERS[3], mode="static", static_layer=4, fused=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        rt.score(z_final, z_layers, bank, TAU, LAYERS[3], mode="best", fused=True)


def test_scorer_passes_fused_scoring_through():
    from timm.models.vision_transformer import VisionTransformer

    from siglip_dola.loading import from_model
    from siglip_dola.scorer import DoLaSigLIP
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=D, depth=24, num_heads=2, mlp_ratio=2.0,
                            class_token=False, global_pool="map", num_classes=0).eval()
    loaded = from_model(vit, logit_scale=math.log(30.0))
    pixels = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    bank = torch.randn(C, D, generator=torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match="fused_scoring must be True or False"):
        DoLaSigLIP(loaded, fused_scoring=1)
    eager = DoLaSigLIP(loaded, batch_size=B).score_pixels(pixels, bank)
    fused = DoLaSigLIP(loaded, batch_size=B, fused_scoring=True).score_pixels(pixels, bank)
    assert_same(fused, eager)
