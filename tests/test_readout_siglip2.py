"""HF Siglip2VisionModel (NaFlex) at real base size (random init, random LayerNorm affines): two images with
different patch grids in one batch, padded to the same length, padding patches filled with noise.

z_final against the model's own pooler_output (bitwise), z_j against the model's own post_layernorm + head
(called with the padding mask) on ``output_hidden_states[j]``, one backbone forward, packed images equal to
explicit inputs, padding contents without effect, and the model left unchanged even when a forward raises.
"""
import pytest
import torch
import transformers

if not hasattr(transformers, "Siglip2VisionModel"):   # a supported release older than 4.50: the class is not there
    pytest.skip(f"transformers {transformers.__version__} has no Siglip2VisionModel (4.50+)", allow_module_level=True)

from transformers import Siglip2VisionConfig, Siglip2VisionModel  # noqa: E402

from siglip_dola.readout import from_model
from siglip_dola.readout.tower_hf_siglip2 import pack, unpack
from test_readout_clip import FP32_TOL, _counted_call, _raising_call_leaves_no_trace, _rel, fill_random_
from test_readout_safety import assert_unchanged, snapshot

try:
    from transformers.initialization import no_init_weights          # transformers 5.x
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.modeling_utils import no_init_weights

PATCHES, GRIDS, LAYERS = 256, [(12, 20), (8, 14)], [2, 6, 11]   # 240 and 112 real patches of 256


@pytest.fixture(scope="module")
def model():
    config = Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 patch_size=16, num_patches=256)
    with no_init_weights():
        return fill_random_(Siglip2VisionModel(config))


def _inputs(seed=0, patch_dim=3 * 16 * 16):
    """Processor-like inputs: real patches first, then padding (noise here: it must not matter)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(GRIDS), PATCHES, patch_dim, generator=generator)
    shapes = torch.tensor(GRIDS)
    mask = (torch.arange(PATCHES)[None] < shapes.prod(-1, keepdim=True)).to(torch.int32)
    return pixel_values, mask, shapes


def _vision(model):
    return getattr(model, "vision_model", model)       # 4.x nests the transformer, 5.x does not


def test_final_and_layers_match_the_models_own_masked_head(model):
    vision = _vision(model)
    blocks = list(vision.encoder.layers)
    readout = from_model(model)
    assert (readout.backend, readout.head_path, readout.num_layers, readout.embed_dim) == ("hf", "masked_map", 12, 768)
    pixel_values, mask, shapes = _inputs()
    before = snapshot(model)
    z_final, z_layers = _counted_call(
        lambda images, layers: readout(images, layers, pixel_attention_mask=mask, spatial_shapes=shapes),
        vision.embeddings.patch_embedding, blocks, pixel_values, LAYERS)
    assert_unchanged(before, model)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes,
                    output_hidden_states=True)
        assert torch.equal(z_final, out.pooler_output)
        for index, layer in enumerate(LAYERS):
            expected = vision.head(vision.post_layernorm(out.hidden_states[layer]), mask)
            assert _rel(z_layers[index], expected) <= FP32_TOL, layer
            unmasked = vision.head(vision.post_layernorm(out.hidden_states[layer]))
            assert _rel(z_layers[index], unmasked) > 1e-3   # the padding would have mattered
    _raising_call_leaves_no_trace(
        model, lambda images, layers: readout(images, layers, pixel_attention_mask=mask, spatial_shapes=shapes),
        blocks, pixel_values, LAYERS)


def test_packed_images_equal_explicit_inputs_and_padding_has_no_effect(model):
    readout = from_model(model)
    pixel_values, mask, shapes = _inputs()
    explicit = readout(pixel_values, [3, 9], pixel_attention_mask=mask, spatial_shapes=shapes)
    packed = pack(pixel_values, shapes)
    assert packed.shape == (2, PATCHES + 1, 768)
    unpacked = unpack(packed)
    assert torch.equal(unpacked["pixel_attention_mask"], mask) and torch.equal(unpacked["spatial_shapes"], shapes)
    repadded = pixel_values.clone()
    repadded[mask == 0] = 7.0                         # other padding contents
    for z_final, z_layers in (readout(packed, [3, 9]), readout(repadded, [3, 9], pixel_attention_mask=mask,
                                                               spatial_shapes=shapes)):
        assert _rel(z_final, explicit[0]) <= 1e-6 and _rel(z_layers, explicit[1]) <= 1e-6


def test_own_head_path_agrees_with_the_folded_masked_head(model):
    pixel_values, mask, shapes = _inputs(seed=1)
    folded, plain = from_model(model), from_model(model, folded_head=False)
    assert plain.head_path == "model"
    _, z_folded = folded(pixel_values, [4, 8], pixel_attention_mask=mask, spatial_shapes=shapes)
    _, z_plain = plain(pixel_values, [4, 8], pixel_attention_mask=mask, spatial_shapes=shapes)
    assert _rel(z_folded, z_plain) <= FP32_TOL


@pytest.mark.parametrize("kwargs, error, match", [
    ({"spatial_shapes": torch.tensor(GRIDS)}, ValueError, "needs both pixel_attention_mask"),
    ({"pixel_attention_mask": torch.ones(2, 5), "spatial_shapes": torch.tensor(GRIDS)}, ValueError,
     "pixel_attention_mask must have shape"),
    ({"pixel_attention_mask": torch.ones(2, PATCHES), "spatial_shapes": torch.ones(2, 2)}, ValueError,
     "spatial_shapes must be an integer tensor"),
    ({"attention_mask": torch.ones(2, PATCHES)}, TypeError, "this model takes \\['pixel_attention_mask'"),
])
def test_bad_naflex_inputs_are_refused_by_name(model, kwargs, error, match):
    pixel_values, _, _ = _inputs()
    with pytest.raises(error, match=match):
        from_model(model)(pixel_values, [2], **kwargs)


def test_images_instead_of_patches_are_refused(model):
    with pytest.raises(ValueError, match="pixel_values must have shape \\[B, P, 768\\]"):
        from_model(model)(torch.randn(1, 3, 224, 224), [2])


def test_cuda_graphs_are_refused_up_front(model):
    """NaFlex syncs on the host inside its forward: capture() and DoLaSigLIP(cuda_graphs=True) say so before any
    capture starts (a capture that breaks midway invalidates the CUDA stream)."""
    from siglip_dola import DoLaSigLIP
    from siglip_dola.loading import from_model as load_from_model
    from siglip_dola.readout import cuda_graphs

    readout = from_model(model)
    with pytest.raises(ValueError, match="not available for SigLIP2 NaFlex"):
        cuda_graphs.capture(readout, torch.zeros(2, 17, 3 * 16 * 16), [2])
    loaded = load_from_model(model, logit_scale=2.0)
    with pytest.raises(ValueError, match="cuda_graphs=False"):
        DoLaSigLIP(loaded, cuda_graphs=True)
