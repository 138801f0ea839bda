"""Janus switch on a timm ViT built as Janus builds its SigLIP tower, wrapped with Janus's attribute names: its own
attn_pool when trained (here: random LayerNorm affines), refused when at its initial values."""
import math

import numpy as np
import pytest
import torch
import torchvision
from scipy.spatial.distance import jensenshannon
from timm.models.vision_transformer import VisionTransformer

from siglip_dola.integrations.janus import JanusDoLa, score_images

DEPTH, WIDTH, IMAGE, TAU = 24, 16, 16, 1 / 50.0


class CLIPVisionTower(torch.nn.Module):
    """Janus's janus/models/clip_encoder.py: `vision_tower` (siglip_vit) + optional `image_norm`, forward = tower(norm(x))."""
    def __init__(self, vision_tower, image_norm):
        super().__init__()
        self.vision_tower, self.image_norm = vision_tower, image_norm


class MultiModalityCausalLM(torch.nn.Module):
    """Janus's janus/models/modeling_vlm.py holds the tower at `vision_model` (language model omitted)."""
    def __init__(self, vision_model):
        super().__init__()
        self.vision_model = vision_model


def random_affines(module, seed):
    """Every LayerNorm's gamma and beta random, as a trained model's are (timm initialises them to 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def vlm():
    # create_siglip_vit("siglip_large_patch16_384") -> VisionTransformer(img_size, patch_size=16, embed_dim=1024,
    # depth=24, num_heads=16, mlp_ratio=4, class_token=False, global_pool="map", num_classes=0), here tiny
    torch.manual_seed(0)
    tower = VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=2,
                              mlp_ratio=4, class_token=False, global_pool="map", num_classes=0).eval()
    random_affines(tower, seed=3)
    norm = torchvision.transforms.Normalize(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    return MultiModalityCausalLM(CLIPVisionTower(tower, norm)).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bank():
    class Bank:
        labels = [f"c{i}" for i in range(6)]
        embeds = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(2))
    return Bank()


def own_layer_probs(vlm, pixels, bank, layers):
    """q_N and q_j through the tower's own image_norm -> get_intermediate_layers(norm=True) / forward_head."""
    tower = vlm.vision_model.vision_tower
    x = vlm.vision_model.image_norm(pixels)
    with torch.no_grad():
        z_final = tower.forward_head(tower.forward_features(x))
        early = tower.get_intermediate_layers(x, n=[j - 1 for j in layers], norm=True)  # 0-based block index
        z_layers = [tower.forward_head(h) for h in early]
    bank = torch.nn.functional.normalize(bank.embeds.double(), dim=-1)

    def probs(z):
        return torch.softmax(torch.nn.functional.normalize(z.double(), dim=-1) @ bank.T / TAU, -1).numpy()
    return probs(z_final), {j: probs(z) for j, z in zip(layers, z_layers)}


def test_switch_off_is_the_baseline(vlm, pixels, bank):
    q_final, _ = own_layer_probs(vlm, pixels, bank, [2])
    result = score_images(vlm, pixels, bank, tau=TAU, use_dola_siglip=False)
    np.testing.assert_allclose(result.probs.numpy(), q_final, atol=2e-5)
    assert (result.premature_layer == -1).all()
    top = JanusDoLa(vlm, bank, tau=TAU, use_dola_siglip=False).classify(pixels, top_k=1)
    assert [r["predictions"][0]["label"] for r in top] == [bank.labels[i] for i in q_final.argmax(-1)]


@pytest.mark.parametrize("target", ["vlm", "vision_model"])
def test_switch_on_is_dola_through_the_towers_own_path(vlm, pixels, bank, target):
    model = vlm if target == "vlm" else vlm.vision_model
    layers = [18, 20, 22]
    q_final, q = own_layer_probs(vlm, pixels, bank, layers)
    result = score_images(model, pixels, bank, tau=TAU, use_dola_siglip=True)
    for b in range(len(pixels)):
        jsd = {j: jensenshannon(q_final[b], q[j][b]) ** 2 for j in layers}
        best = max(layers, key=lambda j: jsd[j])
        assert int(result.premature_layer[b]) == best
        np.testing.assert_allclose(result.jsd[:, b].numpy(), [jsd[j] for j in layers], atol=2e-5)
        keep = q_final[b] >= 0.1 * q_final[b].max()
        contrast = np.where(keep, np.log(q_final[b]) - np.log(q[best][b]), -np.inf)
        expected = np.exp(contrast - contrast.max()) / np.exp(contrast - contrast.max()).sum()
        np.testing.assert_allclose(result.probs[b].numpy(), expected, atol=2e-5)


def test_janus_model_is_not_modified(vlm, pixels, bank):
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    hooks = [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in vlm.modules()]
    JanusDoLa(vlm, bank, tau=TAU, mode="static").classify(pixels)
    score_images(vlm, pixels, bank, tau=TAU)
    assert all(torch.equal(before[k], v) for k, v in vlm.state_dict().items())
    assert hooks == [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in vlm.modules()]


def test_bad_janus_inputs(vlm, pixels, bank):
    with pytest.raises(ValueError, match="tau"):
        JanusDoLa(vlm, bank, tau=None)
    with pytest.raises(TypeError, match="use_dola_siglip"):
        JanusDoLa(vlm, bank, tau=TAU, use_dola_siglip="yes")

    class WrongBank:
        labels = ["a"]
        embeds = torch.ones(1, WIDTH + 3)
    with pytest.raises(ValueError, match=f"D={WIDTH}"):
        JanusDoLa(vlm, WrongBank(), tau=TAU)
    assert math.isclose(JanusDoLa(vlm, bank, tau=TAU).scorer.tau, TAU)


def test_bank_encoded_by_the_siglip_text_tower_is_accepted(vlm, pixels, bank):
    """Janus has no text tower: its bank always comes from another model (the SigLIP checkpoint's text tower)."""
    from siglip_dola.text_bank.bank import TextBank

    foreign = TextBank(labels=list(bank.labels), embeds=bank.embeds, model_id="google/siglip-large-patch16-384")
    got = JanusDoLa(vlm, foreign, tau=TAU).classify(pixels, top_k=1)
    want = JanusDoLa(vlm, bank, tau=TAU).classify(pixels, top_k=1)
    assert got == want


def test_untrained_attn_pool_is_refused(pixels, bank):
    """The original repo never calls attn_pool: one whose LayerNorm is at gamma=1, beta=0 is not a trained head."""
    torch.manual_seed(0)
    tower = VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=2, mlp_ratio=4,
                              class_token=False, global_pool="map", num_classes=0).eval()
    model = MultiModalityCausalLM(CLIPVisionTower(tower, None)).eval()
    with pytest.raises(ValueError, match=r"attn_pool LayerNorm is exactly at its initial values.*pass siglip="):
        JanusDoLa(model, bank, tau=TAU)
    with torch.no_grad():
        tower.attn_pool.norm.bias[0] = 1e-3   # one value off the initial ones: a head someone trained
    JanusDoLa(model, bank, tau=TAU).classify(pixels)
