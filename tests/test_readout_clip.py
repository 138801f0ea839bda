"""CLIP-family towers at real sizes (random init): open_clip ViT-B-32, ViT-L-14-336, CoCa ViT-B-32 (attention
pool), open_clip average pooling, HF CLIPVisionModelWithProjection at ViT-L/14-336.

Each: one readout call (the test's own hooks count the patch embedding and every block), z_final against
the model's own image embedding (bitwise), z_j against the model's own ln_post / pooling / proj written out
here on block j's output as the model itself returns it (open_clip ``forward_intermediates``, HF
``output_hidden_states``), and the model left exactly as it was, also after a forward that raises.
"""
import open_clip
import pytest
import torch
import torch.nn as nn
from open_clip.transformer import VisionTransformer
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from siglip_dola.readout import from_model
from test_readout_safety import assert_unchanged, snapshot

try:
    from transformers.initialization import no_init_weights          # transformers 5.x
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.modeling_utils import no_init_weights

FP32_TOL = 1e-5


def fill_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights: matrices ~ N(0, 1/fan_in); every LayerNorm a random affine (gamma ~ 1 + N(0, 0.3^2),
    beta ~ N(0, 0.3^2)); other vectors ~ N(0, 0.02^2). Random init would leave gamma = 1, beta = 0."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if id(param) in norms:
                param.copy_((1 + 0.3 * noise) if name.endswith("weight") else 0.3 * noise)
            elif param.dim() > 1:
                param.copy_(noise * param.shape[-1] ** -0.5 if name.endswith(("proj", "query")) else
                            noise * param[0].numel() ** -0.5)
            else:
                param.copy_(0.02 * noise)
    return module.eval()


def _open_clip(name: str) -> nn.Module:
    """Built on the meta device (the library initialisers take tens of seconds on CPU), then filled here; a
    tower with buffers (EVA's rope tables) is built for real: to_empty would leave its buffers uninitialised."""
    model = open_clip.create_model(name, pretrained=None, device="meta")
    if any(True for _ in model.visual.buffers()):
        model = open_clip.create_model(name, pretrained=None)
    else:
        model.to_empty(device="cpu")
    return fill_random_(model)


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _counted_call(readout, stem: nn.Module, blocks, images, layers):
    """readout(images, layers) while the test's hooks count calls of the patch embedding and of each block."""
    calls = {"stem": 0, "blocks": [0] * len(blocks)}
    handles = [stem.register_forward_hook(lambda *_: calls.__setitem__("stem", calls["stem"] + 1))]
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_hook(
            lambda *_, i=index: calls["blocks"].__setitem__(i, calls["blocks"][i] + 1)))
    try:
        z_final, z_layers = readout(images, layers=layers)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"stem": 1, "blocks": [1] * len(blocks)}, calls   # ONE backbone forward
    return z_final, z_layers


def _raising_call_leaves_no_trace(model: nn.Module, readout, blocks, images, layers) -> None:
    """A forward that raises in the second requested block (after the readout's first hook ran and registered
    the others) leaves the model as it was."""
    before = snapshot(model)

    def explode(module, args, output):
        raise RuntimeError("boom inside the forward")
    handle = blocks[sorted(layers)[1] - 1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            readout(images, layers=layers)
    finally:
        handle.remove()
    assert_unchanged(before, model)


def _open_clip_reference(visual, images, layers):
    """(own image embedding, {j: block j's full token output}) from the model's own forward_intermediates."""
    with torch.no_grad():
        out = visual.forward_intermediates(images, indices=[j - 1 for j in layers], output_fmt="NLC",
                                           output_extra_tokens=True)
    tokens = {j: torch.cat([prefix, rest], dim=1) for j, prefix, rest in
              zip(layers, out["image_intermediates_prefix"], out["image_intermediates"])}
    return out["image_features"], tokens


def _check_open_clip(model, layer_embedding, images, layers, head_path):
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    readout = from_model(model)
    assert (readout.backend, readout.head_path, readout.num_layers) == ("open_clip", head_path, len(blocks))
    before = snapshot(model)
    z_final, z_layers = _counted_call(readout, visual.conv1, blocks, images, layers)
    assert_unchanged(before, model)
    with torch.no_grad():
        own = model.encode_image(images, normalize=False)   # raw (CoCa's default normalises)
    assert torch.equal(z_final, own)                                   # exactly the model's own embedding
    features, tokens = _open_clip_reference(visual, images, layers)
    assert _rel(features, own) <= 1e-6
    with torch.no_grad():
        for index, layer in enumerate(layers):
            assert _rel(z_layers[index], layer_embedding(visual, tokens[layer])) <= FP32_TOL, layer
    _raising_call_leaves_no_trace(model, readout, blocks, images, layers)
    return readout


def _class_token(visual, h):        # OpenAI CLIP: ln_post over the tokens, class token, proj
    return visual.ln_post(h)[:, 0] @ visual.proj


def _coca_pool(visual, h):          # open_clip CoCa: attention pool, ln_post, then pool_type 'tok': query 0
    return visual.ln_post(visual.attn_pool(h))[:, 0] @ visual.proj


def test_open_clip_vit_b_32():
    _check_open_clip(_open_clip("ViT-B-32"), _class_token, _images(2, 224), [1, 6, 11], "token")


def test_open_clip_vit_l_14_336():
    _check_open_clip(_open_clip("ViT-L-14-336"), _class_token, _images(1, 336), [2, 12, 23], "token")


def test_open_clip_coca_vit_b_32_attention_pool():
    model = _open_clip("coca_ViT-B-32")
    assert model.visual.attn_pool is not None and model.visual.output_tokens   # encode_image: (pooled, tokens)
    _check_open_clip(model, _coca_pool, _images(1, 224), [3, 8, 11], "pooled")


class VisualHolder(nn.Module):
    """The part of open_clip's CLIP the readout uses: ``.visual`` and ``encode_image``."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def encode_image(self, images, normalize=False):
        features = self.visual(images)
        return nn.functional.normalize(features, dim=-1) if normalize else features


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_open_clip_average_pooling(final_ln_after_pool):
    visual = fill_random_(VisionTransformer(image_size=64, patch_size=16, width=64, layers=4, heads=4, mlp_ratio=2,
                                            output_dim=32, pool_type="avg", final_ln_after_pool=final_ln_after_pool))

    def average(visual, h):         # patch tokens only; ln_post before or after the mean, as configured
        if final_ln_after_pool:
            return visual.ln_post(h[:, 1:].mean(dim=1)) @ visual.proj
        return visual.ln_post(h)[:, 1:].mean(dim=1) @ visual.proj
    _check_open_clip(VisualHolder(visual), average, _images(2, 64), [1, 2, 3], "pooled")


def test_open_clip_head_forms_that_give_no_vector_are_refused():
    visual = VisionTransformer(image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2,
                               output_dim=16, pool_type="none")
    with pytest.raises(ValueError, match="supported: class token.*average.*attention pool"):
        from_model(visual)


def test_hf_clip_vision_with_projection_vit_l_14_336():
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    with no_init_weights():
        model = fill_random_(CLIPVisionModelWithProjection(config))
    vision = model.vision_model
    blocks = list(vision.encoder.layers)
    layers = [2, 12, 23]
    readout = from_model(model)
    assert (readout.backend, readout.head_path, readout.num_layers, readout.embed_dim) == ("hf", "token", 24, 768)
    images = _images(1, 336)
    before = snapshot(model)
    z_final, z_layers = _counted_call(readout, vision.embeddings.patch_embedding, blocks, images, layers)
    assert_unchanged(before, model)
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True)
        assert torch.equal(z_final, out.image_embeds)
        # hidden_states[0] is the embedding after pre_layrnorm; hidden_states[j] is block j's output
        assert len(out.hidden_states) == 25
        for index, layer in enumerate(layers):
            expected = model.visual_projection(vision.post_layernorm(out.hidden_states[layer][:, 0]))
            assert _rel(z_layers[index], expected) <= FP32_TOL, layer
    _raising_call_leaves_no_trace(model, readout, blocks, images, layers)


def test_token_head_and_the_models_own_head_agree():
    """folded_head=False reads each layer through the model's own pooling (no token shortcut): same layers."""
    model = VisualHolder(fill_random_(VisionTransformer(image_size=64, patch_size=16, width=64, layers=12, heads=4,
                                                        mlp_ratio=2, output_dim=32)))
    images = _images(2, 64, seed=3)
    fast, plain = from_model(model), from_model(model, folded_head=False)
    assert (fast.head_path, plain.head_path) == ("token", "model")
    (zf_fast, zl_fast), (zf_plain, zl_plain) = fast(images, [2, 5, 9]), plain(images, [2, 5, 9])
    assert torch.equal(zf_fast, zf_plain) and _rel(zl_fast, zl_plain) <= FP32_TOL


def test_open_clip_eva02_b_16_timm_trunk_class_token():
    """open_clip builds EVA through timm (Eva trunk, global_pool='token', rope): layer j = head(norm(h_j)[:, 0])."""
    model = _open_clip("EVA02-B-16")
    trunk = model.visual.trunk
    blocks, layers = list(trunk.blocks), [2, 6, 11]
    readout = from_model(model)
    assert (readout.backend, readout.head_path, readout.num_layers) == ("timm", "token", 12)
    images = _images(1, 224)
    before = snapshot(model)
    z_final, z_layers = _counted_call(readout, trunk.patch_embed, blocks, images, layers)
    assert_unchanged(before, model)
    with torch.no_grad():
        assert torch.equal(z_final, model.encode_image(images))
        intermediates = trunk.forward_intermediates(images, indices=[j - 1 for j in layers], output_fmt="NLC",
                                                    intermediates_only=True, return_prefix_tokens=True)
        for index, (patches, prefix) in enumerate(intermediates):   # the model's own pool: token 0 of norm(h_j)
            h = torch.cat([prefix, patches], dim=1)
            expected = model.visual.head(trunk.head(trunk.fc_norm(trunk.norm(h)[:, 0])))
            assert _rel(z_layers[index], expected) <= FP32_TOL, layers[index]
    _raising_call_leaves_no_trace(model, readout, blocks, images, layers)


def test_timm_average_pool_tower_reads_layers_through_its_own_head():
    import timm

    tower = fill_random_(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, depth=4,
                                           embed_dim=64, num_heads=4, img_size=64, global_pool="avg",
                                           fc_norm=True))
    readout = from_model(tower)
    assert readout.head_path == "model"
    images = _images(2, 64)
    z_final, z_layers = _counted_call(readout, tower.patch_embed, list(tower.blocks), images, [1, 3])
    with torch.no_grad():
        assert torch.equal(z_final, tower(images))
        for index, tokens in enumerate(tower.forward_intermediates(images, indices=[0, 2], output_fmt="NLC",
                                                                   intermediates_only=True,
                                                                   return_prefix_tokens=True)):
            h = torch.cat([tokens[1], tokens[0]], dim=1)
            expected = tower.fc_norm(tower.norm(h)[:, 1:].mean(dim=1))   # avg over patch tokens, then fc_norm
            assert _rel(z_layers[index], expected) <= FP32_TOL
