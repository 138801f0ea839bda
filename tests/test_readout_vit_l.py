"""Real ViT-L/16-384 size (batch 1, random init): open_clip, HF and a Janus-style timm tower.

One readout call each; the test's own hooks count block calls and collect the block outputs of that
same forward, and the reference is the model's own final norm + head applied to them. Weights are
filled with seeded random values by the test (the library initialisers take tens of seconds on CPU).
"""
import open_clip
import torch
import torch.nn as nn
import torchvision.transforms
from transformers import SiglipVisionConfig, SiglipVisionModel

from siglip_dola.readout import from_model
from test_readout import CLIPVisionTowerLike, JanusStyleTower, MultiModalityLike

try:
    from transformers.initialization import no_init_weights          # transformers 5.x
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.modeling_utils import no_init_weights

DEPTH, LAYERS = 24, [2, 12, 23]


def fill_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights: matrices ~ N(0, 1/fan_in), LayerNorm gamma ~ 1 + N(0, 0.1^2), latent query ~ N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("latent", "probe")):
                param.copy_(noise)
            elif param.dim() > 1:
                param.copy_(noise * param[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)
    return module.eval()


def check_one_pass_readout(model, blocks, layer_embedding, image_size=384):
    """One readout call: every block runs once, z_final and z_j equal the model's own head on that forward."""
    readout = from_model(model)
    calls, outputs = [0] * len(blocks), {}

    def hook(module, args, output, index):
        calls[index] += 1
        outputs[index + 1] = output[0] if isinstance(output, tuple) else output
    handles = [block.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, block in enumerate(blocks)]
    images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        z_final, z_layers = readout(images, layers=LAYERS)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1] * DEPTH and readout.num_layers == DEPTH and readout.head_path == "folded"
    assert z_final.shape == (1, readout.embed_dim) and z_layers.shape == (len(LAYERS), 1, readout.embed_dim)
    with torch.no_grad():
        expected_final = layer_embedding(outputs[DEPTH])
        assert ((z_final - expected_final).abs().max() / expected_final.abs().max()).item() <= 1e-6
        for index, layer in enumerate(LAYERS):
            expected = layer_embedding(outputs[layer])
            assert ((z_layers[index] - expected).abs().max() / expected.abs().max()).item() <= 1e-5, layer


def test_open_clip_vit_l_16_siglip_384():
    model = open_clip.create_model("ViT-L-16-SigLIP-384", pretrained=None, device="meta")
    model.to_empty(device="cpu")
    fill_random_(model.visual)
    for param in model.text.parameters():
        param.detach().zero_()
    trunk, head = model.visual.trunk, model.visual.head
    check_one_pass_readout(model, list(trunk.blocks), lambda h: head(trunk.forward_head(trunk.norm(h))))


def test_hf_siglip_vision_model_vit_l_384():
    config = SiglipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=384, patch_size=16)
    with no_init_weights():
        model = fill_random_(SiglipVisionModel(config))
    vit = getattr(model, "vision_model", model)       # 4.x nests the transformer, 5.x does not
    check_one_pass_readout(model, list(vit.encoder.layers), lambda h: vit.head(vit.post_layernorm(h)))


def test_janus_style_siglip_large_patch16_384():
    """Janus builds siglip_large_patch16_384 as VisionTransformer(..., global_pool='map', num_classes=0), tokens out."""
    janus = dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                 class_token=False, global_pool="map", num_classes=0)
    try:
        with torch.device("meta"):   # no time spent on timm's own init: fill_random_ overwrites every weight
            tower = JanusStyleTower(**janus)
        tower.to_empty(device="cpu")
    except RuntimeError:   # older timm reads its drop-path schedule with .item(), which a meta tensor refuses
        tower = JanusStyleTower(**janus)
    fill_random_(tower)
    image_norm = torchvision.transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3)
    model = MultiModalityLike(CLIPVisionTowerLike(tower, image_norm))
    check_one_pass_readout(model, list(tower.blocks), lambda h: tower.forward_head(tower.norm(h)))
