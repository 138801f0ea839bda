"""Tests for siglip_dola.readout on tiny models: one pass, exact z_final, z_j vs the model's own modules, zero mutation."""
import dataclasses
from dataclasses import dataclass
from typing import Callable

import open_clip
import pytest
import torch
import torch.nn as nn
import torchvision.transforms
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from siglip_dola.readout import from_model

SIZE, PATCH, DIM, DEPTH, HEADS = 32, 8, 64, 4, 4


class JanusStyleTower(VisionTransformer):
    """Like Janus's tower (timm VisionTransformer, ignore_head=True): forward returns the normed tokens."""

    def forward(self, x):
        return self.forward_features(x)


class CLIPVisionTowerLike(nn.Module):
    """Janus attribute names: .vision_tower and .image_norm."""

    def __init__(self, tower, image_norm):
        super().__init__()
        self.vision_tower, self.image_norm = tower, image_norm


class MultiModalityLike(nn.Module):
    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model


@dataclass
class Case:
    model: nn.Module
    blocks: list                       # the model's blocks, for the reference
    layer_embedding: Callable          # block output (B, T, D) -> (B, D) via the model's own norm + head
    embed: Callable                    # images -> the model's own embedding


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _timm_vit(cls=VisionTransformer, **kwargs):
    torch.manual_seed(0)
    args = dict(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                class_token=False, global_pool="map", num_classes=0)
    return cls(**{**args, **kwargs}).eval()


def _timm_case(**kwargs):
    vit = _timm_vit(**kwargs)
    return Case(vit, list(vit.blocks), lambda h: vit.forward_head(vit.norm(h)),
                lambda x: vit.forward_head(vit.forward_features(x)))


def _janus_case(wrap):
    tower = _timm_vit(JanusStyleTower)
    with torch.no_grad():   # a trained head: Janus towers whose attn_pool.norm is at gamma=1, beta=0 are refused
        norm, generator = tower.attn_pool.norm, torch.Generator().manual_seed(5)
        norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
        norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator))
    image_norm = torchvision.transforms.Normalize(mean=[0.5] * 3, std=[0.25] * 3)
    vision_model = CLIPVisionTowerLike(tower, image_norm)
    model = {"tower": tower, "vision_model": vision_model, "lm": MultiModalityLike(vision_model)}[wrap]
    norm = image_norm if wrap != "tower" else nn.Identity()
    return Case(model, list(tower.blocks), lambda h: tower.forward_head(tower.norm(h)),
                lambda x: tower.forward_head(tower(norm(x))))


def _open_clip_case():
    """Real open_clip classes (CustomTextCLIP + TimmModel with a linear proj) around a tiny MAP trunk."""
    torch.manual_seed(0)
    vision_cfg = dict(timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear", image_size=SIZE)
    text_cfg = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = open_clip.CustomTextCLIP(embed_dim=48, vision_cfg=vision_cfg, text_cfg=text_cfg)
    model.visual.trunk = _timm_vit()
    model.visual.head.proj = nn.Linear(DIM, 48, bias=False)
    model.eval()
    trunk, head = model.visual.trunk, model.visual.head
    return Case(model, list(trunk.blocks), lambda h: head(trunk.forward_head(trunk.norm(h))), model.encode_image)


def _hf_vision_config():
    return SiglipVisionConfig(hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=DEPTH,
                              num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH)


def _hf_layer_embedding(vision):
    vit = getattr(vision, "vision_model", vision)     # 4.x nests the transformer, 5.x does not
    return vit, lambda h: vit.head(vit.post_layernorm(h))


def _hf_vision_case():
    torch.manual_seed(0)
    model = SiglipVisionModel(_hf_vision_config()).eval()
    vit, layer_embedding = _hf_layer_embedding(model)
    return Case(model, list(vit.encoder.layers), layer_embedding, lambda x: model(pixel_values=x).pooler_output)


def _hf_siglip_case():
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    model = SiglipModel(SiglipConfig(vision_config=_hf_vision_config().to_dict(), text_config=text)).eval()
    vit, layer_embedding = _hf_layer_embedding(model.vision_model)

    def embed(x):
        out = model.get_image_features(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    return Case(model, list(vit.encoder.layers), layer_embedding, embed)


CASES = {
    "timm": _timm_case,
    "timm_class_token": lambda: _timm_case(class_token=True),
    "janus_tower": lambda: _janus_case("tower"),
    "janus_vision_model": lambda: _janus_case("vision_model"),
    "janus_lm": lambda: _janus_case("lm"),
    "open_clip": _open_clip_case,
    "hf_vision": _hf_vision_case,
    "hf_siglip": _hf_siglip_case,
}


def _images(batch=2, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def reference(case, images):
    """(z_final, {j: z_j}) from the model's own forward and modules; block outputs collected by hooks here."""
    outputs = {}
    handles = [block.register_forward_hook(lambda m, a, o, j=j: outputs.__setitem__(j, _first(o)))
               for j, block in enumerate(case.blocks, start=1)]
    try:
        with torch.no_grad():
            z_final = case.embed(images)
            layers = {j: case.layer_embedding(h) for j, h in outputs.items()}
    finally:
        for handle in handles:
            handle.remove()
    return z_final, layers


def _rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", CASES)
def test_final_and_every_layer_match_the_models_own_modules(name):
    case = CASES[name]()
    readout = from_model(case.model)
    images = _images()
    expected_final, expected_layers = reference(case, images)
    layers = list(range(1, DEPTH))
    z_final, z_layers = readout(images, layers=layers)
    assert readout.num_layers == DEPTH and readout.image_size == (SIZE, SIZE)
    assert z_final.shape == (2, readout.embed_dim) and z_layers.shape == (len(layers), 2, readout.embed_dim)
    assert _rel_err(z_final, expected_final) <= 1e-6
    for index, layer in enumerate(layers):
        assert _rel_err(z_layers[index], expected_layers[layer]) <= 1e-5, layer


@pytest.mark.parametrize("name, backend, head_path", [
    ("timm", "timm", "folded"), ("janus_lm", "timm", "folded"), ("open_clip", "timm", "folded"),
    ("hf_vision", "hf", "folded"), ("timm_class_token", "timm", "model"),
])
def test_backend_and_head_path(name, backend, head_path):
    readout = from_model(CASES[name]().model)
    assert (readout.backend, readout.head_path) == (backend, head_path)


@pytest.mark.parametrize("name", ["timm", "hf_vision"])
def test_layers_in_requested_order_and_empty_layers(name):
    case = CASES[name]()
    readout = from_model(case.model)
    images = _images()
    z_final, z_layers = readout(images, layers=[3, 1])
    _, expected = reference(case, images)
    assert _rel_err(z_layers[0], expected[3]) <= 1e-5 and _rel_err(z_layers[1], expected[1]) <= 1e-5
    for empty in (None, []):
        final_only, none = readout(images, layers=empty)
        assert none.shape == (0, 2, readout.embed_dim)
        assert torch.equal(final_only, z_final)


@pytest.mark.parametrize("name", ["timm", "hf_vision"])
def test_only_the_earliest_block_is_hooked_before_the_forward(name):
    """The later layers' hooks are registered from the earliest requested block's hook (the set-up's CPU time
    then overlaps the forward); they still read the right blocks, and none is left afterwards."""
    case = CASES[name]()
    readout = from_model(case.model)
    seen, tower = [], readout._tower
    def embed(images):
        seen.append([len(block._forward_hooks) for block in case.blocks])
        return tower.embed(images)
    readout._tower = dataclasses.replace(tower, embed=embed)
    images = _images()
    _, z_layers = readout(images, layers=[3, 2])
    _, expected = reference(case, images)
    assert [[count > 0 for count in hooks] for hooks in seen] == [[False, True, False, False]]   # block 2 only
    assert _rel_err(z_layers[0], expected[3]) <= 1e-5 and _rel_err(z_layers[1], expected[2]) <= 1e-5
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in case.model.modules())


@pytest.mark.parametrize("name", ["timm", "hf_vision", "open_clip"])
def test_exactly_one_backbone_forward(name):
    case = CASES[name]()
    readout = from_model(case.model)
    calls = [0] * DEPTH
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(case.blocks)]
    try:
        readout(_images(), layers=list(range(1, DEPTH)))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1] * DEPTH


def test_folded_head_follows_weight_dtype_and_in_place_changes():
    case = _timm_case()
    readout = from_model(case.model)
    images = _images()
    with torch.no_grad():
        case.model.attn_pool.kv.weight.mul_(1.7)        # the test changes its own model; the cache must follow
        case.model.norm.bias.add_(0.3)
    expected_final, expected = reference(case, images)
    z_final, z_layers = readout(images, layers=[2])
    assert _rel_err(z_final, expected_final) <= 1e-6 and _rel_err(z_layers[0], expected[2]) <= 1e-5
    case.model.double()
    expected_final, expected = reference(case, images.double())
    z_final, z_layers = readout(images.double(), layers=[1, 2])
    assert z_layers.dtype == torch.float64 and readout.head_path == "folded"
    assert _rel_err(z_layers[0], expected[1]) <= 1e-10 and _rel_err(z_layers[1], expected[2]) <= 1e-10


def test_folded_head_follows_a_replaced_head_submodule_and_parameter():
    case = _timm_case()
    readout = from_model(case.model)
    images = _images()
    readout(images, layers=[2])                             # the folded head is built and cached
    torch.manual_seed(3)
    kv = case.model.attn_pool.kv
    case.model.attn_pool.kv = nn.Linear(kv.in_features, kv.out_features)   # a new module (folded into the head)
    expected_final, expected = reference(case, images)
    z_final, z_layers = readout(images, layers=[1, 2])
    assert _rel_err(z_final, expected_final) <= 1e-6
    assert _rel_err(z_layers[0], expected[1]) <= 1e-5 and _rel_err(z_layers[1], expected[2]) <= 1e-5
    case.model.attn_pool.latent = nn.Parameter(torch.randn_like(case.model.attn_pool.latent))   # a new parameter
    _, expected = reference(case, images)
    assert _rel_err(readout(images, layers=[2])[1][0], expected[2]) <= 1e-5


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    case = _timm_case()
    readout = from_model(case.model)
    images = _images()
    z_final32, z_layers32 = readout(images, layers=[1, 3])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z_final16, z_layers16 = readout(images, layers=[1, 3])
    assert torch.isfinite(z_layers16.float()).all()
    assert _rel_err(z_final16.float(), z_final32) < 0.1 and _rel_err(z_layers16.float(), z_layers32) < 0.1


def test_model_head_fallback_for_qk_norm_head_matches_reference():
    case = _timm_case()
    torch.manual_seed(1)
    case.model.attn_pool = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    readout = from_model(case.model)
    assert readout.head_path == "model" and readout.fallback_reason
    images = _images()
    _, expected = reference(case, images)
    _, z_layers = readout(images, layers=[2])
    assert _rel_err(z_layers[0], expected[2]) <= 1e-6


def test_folded_head_can_be_switched_off_and_gives_the_same_layers():
    case = _timm_case()
    images = _images()
    folded, own = from_model(case.model), from_model(case.model, folded_head=False)
    assert (folded.head_path, own.head_path) == ("folded", "model")
    z_folded, z_own = folded(images, layers=[1, 2, 3]), own(images, layers=[1, 2, 3])
    assert torch.equal(z_folded[0], z_own[0]) and _rel_err(z_folded[1], z_own[1]) <= 1e-5
    with pytest.raises(TypeError, match="folded_head"):
        from_model(case.model, folded_head="yes")
