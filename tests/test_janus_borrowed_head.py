"""A Janus tower read through a borrowed SigLIP head, at SigLIP-L/16-384's size (24 layers, width 1024, 576 tokens).

Both forms of Janus: transformers' JanusVisionModel (no head at all) and the original repository's timm-style
tower in MultiModalityCausalLM (attn_pool at its initial values: untrusted). Each is checked against a naive
float64 computation from Janus's own forward (hidden_states[j] / get_intermediate_layers) through the SigLIP
head's own modules, copied to float64, after Janus's own final norm (borrowed_head.py's choice). Random weights,
every LayerNorm with a random affine.
"""
import copy

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
import transformers
from transformers import SiglipVisionConfig, SiglipVisionModel

# transformers ships Janus from 4.53 on: its tests skip below that; the original repository's tower runs everywhere
JanusVisionConfig = getattr(transformers, "JanusVisionConfig", None)
JanusVisionModel = getattr(transformers, "JanusVisionModel", None)
needs_hf_janus = pytest.mark.skipif(JanusVisionModel is None,
                                    reason=f"transformers {transformers.__version__} has no JanusVisionModel (4.53+)")

from siglip_dola.readout import from_model
from test_janus import CLIPVisionTower, MultiModalityCausalLM, random_affines

WIDTH, HEADS, IMAGE, PATCH = 1024, 16, 384, 16
LAYERS = list(range(1, 24))


def siglip_l_timm(depth):
    """timm's vit_large_patch16_siglip_384 layout (Janus's create_siglip_vit builds the same tower)."""
    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                             mlp_ratio=4, class_token=False, global_pool="map", num_classes=0).eval()


@pytest.fixture(scope="module")
def janus_hf():
    if JanusVisionModel is None:
        pytest.skip(f"transformers {transformers.__version__} has no JanusVisionModel (4.53+)")
    torch.manual_seed(0)
    return random_affines(JanusVisionModel(JanusVisionConfig()).eval(), seed=1)   # defaults: SigLIP-L/16-384


@pytest.fixture(scope="module")
def siglip_hf():
    """The head source: a HF SigLIP vision model of SigLIP-L's width (2 blocks: only its head is used)."""
    torch.manual_seed(2)
    config = SiglipVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=HEADS,
                                num_hidden_layers=2, image_size=IMAGE, patch_size=PATCH, vision_use_head=True)
    return random_affines(SiglipVisionModel(config).eval(), seed=3)


def siglip_vision(model):
    """The module holding embeddings and head: the model itself in transformers 5, .vision_model in 4.x."""
    return getattr(model, "vision_model", model)


def state(model):
    """Everything that must not change: weights, hooks, train/eval and requires_grad flags."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def assert_unchanged(model, before):
    weights, hooks, grads = state(model)
    assert weights.keys() == before[0].keys() and all(torch.equal(before[0][k], v) for k, v in weights.items())
    assert hooks == before[1] and grads == before[2]


def count_calls(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


def assert_close(got, want):
    want = want.numpy()
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_transformers_janus_without_head_is_refused(janus_hf):
    with pytest.raises(ValueError, match="no pooling head.*pass head_from"):
        from_model(janus_hf)


def test_transformers_janus_through_siglip_head_equals_float64(janus_hf, siglip_hf):
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))   # batch 1: CPU time
    janus_before, siglip_before = state(janus_hf), state(siglip_hf)
    readout = from_model(janus_hf, head_from=siglip_hf)
    assert readout.head_path == "folded" and readout.num_layers == 24
    forwards, handle = count_calls(janus_hf.embeddings)
    siglip_forwards, siglip_handle = count_calls(siglip_vision(siglip_hf).embeddings)
    try:
        z_final, z_layers = readout(pixels, layers=LAYERS)
    finally:
        handle.remove(), siglip_handle.remove()
    assert len(forwards) == 1 and len(siglip_forwards) == 0   # one Janus forward; SigLIP's own trunk never runs
    assert_unchanged(janus_hf, janus_before), assert_unchanged(siglip_hf, siglip_before)

    with torch.no_grad():
        hidden = janus_hf(pixel_values=pixels, output_hidden_states=True).hidden_states   # [0] = embeddings
        norm64 = copy.deepcopy(janus_hf.post_layernorm).double()                     # Janus's own final norm
        head64 = copy.deepcopy(siglip_vision(siglip_hf).head).double()                  # SigLIP's MAP head
        for i, layer in enumerate(LAYERS):
            assert_close(z_layers[i], head64(norm64(hidden[layer].double())))
        assert_close(z_final, head64(norm64(hidden[24].double())))


def test_exception_mid_forward_leaves_janus_unchanged(janus_hf, siglip_hf):
    before = state(janus_hf)
    readout = from_model(janus_hf, head_from=siglip_hf)

    def fail(*_):
        raise RuntimeError("stop at block 5")
    handle = janus_hf.encoder.layers[4].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="block 5"):
            readout(torch.randn(1, 3, IMAGE, IMAGE), layers=LAYERS)
    finally:
        handle.remove()
    assert_unchanged(janus_hf, before)


def test_original_janus_tower_untrusted_head_refused_and_borrowed():
    torch.manual_seed(5)
    tower = siglip_l_timm(24)
    random_affines(tower.blocks, seed=6), random_affines(tower.norm, seed=7)   # attn_pool.norm stays at 1 / 0
    vlm = MultiModalityCausalLM(CLIPVisionTower(tower, None)).eval()
    siglip = random_affines(siglip_l_timm(2), seed=8)   # e.g. open_clip ViT-L-16-SigLIP-384's visual.trunk
    with pytest.raises(ValueError, match="attn_pool LayerNorm is exactly at its initial values.*pass head_from"):
        from_model(vlm)
    before = state(vlm)
    readout = from_model(vlm, head_from=siglip)
    pixels = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(9))
    forwards, handle = count_calls(tower.patch_embed)
    try:
        z_final, z_layers = readout(pixels, layers=LAYERS)
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert_unchanged(vlm, before)
    with torch.no_grad():
        raw = tower.get_intermediate_layers(pixels, n=list(range(24)), norm=False)   # block outputs, 0-based
        norm64, head64 = copy.deepcopy(tower.norm).double(), copy.deepcopy(siglip).double()
        for i, layer in enumerate(LAYERS):
            assert_close(z_layers[i], head64.forward_head(norm64(raw[layer - 1].double())))
        assert_close(z_final, head64.forward_head(norm64(raw[23].double())))


def test_head_of_another_width_is_refused(janus_hf):
    small = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                                 num_hidden_layers=2, image_size=32, patch_size=16)).eval()
    with pytest.raises(ValueError, match="head_from's head reads tokens of width 64.*1024"):
        from_model(janus_hf, head_from=small)


@needs_hf_janus
def test_open_clip_siglip_as_the_head_source():
    """open_clip's layout (visual.trunk's attn_pool + visual.head's projection): the head as open_clip calls it."""
    from test_readout import DEPTH, DIM, HEADS, PATCH, SIZE, _open_clip_case

    torch.manual_seed(10)
    janus = random_affines(JanusVisionModel(JanusVisionConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
        num_image_tokens=(SIZE // PATCH) ** 2)).eval(), seed=11)
    open_clip_model = random_affines(_open_clip_case().model, seed=12)
    readout = from_model(janus, head_from=open_clip_model)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(13))
    z_final, z_layers = readout(pixels, layers=[1, 2, 3])
    visual = copy.deepcopy(open_clip_model.visual).double()
    norm64 = copy.deepcopy(janus.post_layernorm).double()
    with torch.no_grad():
        hidden = janus(pixel_values=pixels, output_hidden_states=True).hidden_states
        head64 = lambda h: visual.head(visual.trunk.forward_head(norm64(h.double())))   # noqa: E731
        for i, layer in enumerate([1, 2, 3]):
            assert_close(z_layers[i], head64(hidden[layer]))
        assert_close(z_final, head64(hidden[DEPTH]))
    assert z_final.shape == (2, 48)   # through open_clip's projection
