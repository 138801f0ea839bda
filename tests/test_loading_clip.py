"""load()/from_model() for CLIP-family and SigLIP2 NaFlex models, and the pipeline on them (classify, calibrate,
evaluate): local save_pretrained folders with their processors, open_clip CLIP objects, offline fail-fast names.
"""
from __future__ import annotations

import json
import time

import numpy as np
import open_clip
import pytest
import torch
import transformers
from open_clip.transformer import VisionTransformer
from PIL import Image

from siglip_dola import loading
from siglip_dola.loading import hub
from siglip_dola.scorer import DoLaSigLIP
from siglip_dola.text_bank.build import build_text_bank
from test_readout_clip import fill_random_

VOCAB = ["<pad>", "<unk>", "</s>", "a", "photo", "of", "cat", "dog", "red", "car", "circle", "square"]
LABELS = ["cat", "dog", "red car"]

# Siglip2Model arrived in transformers 4.50: on an older release (the CI's lower-bound run) only the SigLIP2
# tests skip, because the class does not exist; CLIP and SigLIP run on every supported release.
HAS_SIGLIP2 = hasattr(transformers, "Siglip2Model")
needs_siglip2 = pytest.mark.skipif(not HAS_SIGLIP2,
                                   reason=f"transformers {transformers.__version__} has no Siglip2Model (4.50+)")


def _embedding(output):
    """transformers 4.x returns the embedding tensor, 5.x an output object holding it as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in [(40, 64, 3), (64, 32, 3)]]


def _text(vocab_size=len(VOCAB), **extra):
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, **extra)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=_text(eos_token_id=2, pad_token_id=0, bos_token_id=1), projection_dim=24,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    model = fill_random_(CLIPModel(config))
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    folder = tmp_path_factory.mktemp("hf_siglip2")
    torch.manual_seed(0)
    config = Siglip2Config(text_config=_text(), vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=2, patch_size=8,
        num_patches=16))
    model = fill_random_(Siglip2Model(config))
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(folder)
    return folder, model


def test_load_hf_clip_folder_reads_the_models_own_embeddings(clip_dir):
    folder, model = clip_dir
    loaded = loading.load(str(folder), device="cpu")
    assert (loaded.backend, loaded.readout.head_path, loaded.readout.num_layers) == ("hf", "token", 12)
    assert loaded.logit_bias == 0.0 and loaded.logit_scale == pytest.approx(float(model.logit_scale.detach()))
    pixels = torch.stack([loaded.preprocess(image) for image in _images()])          # (2, 3, 32, 32)
    assert pixels.shape == (2, 3, 32, 32)
    z_final, _ = loaded.readout(pixels, [2])
    tokens = _tokenizer()(["red car"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(z_final, _embedding(model.get_image_features(pixel_values=pixels)))
        # input ids and mask only: the tokenizer also returns token_type_ids, which 4.x's CLIP text tower refuses
        own_text = _embedding(model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]))
    torch.testing.assert_close(loaded.encode_text(["red car"]), own_text)


@needs_siglip2
def test_load_siglip2_naflex_folder_with_its_processor(siglip2_dir):
    from transformers import Siglip2ImageProcessor

    folder, model = siglip2_dir
    loaded = loading.load(str(folder), device="cpu")
    assert (loaded.backend, loaded.readout.head_path) == ("hf", "masked_map")
    packed = torch.stack([loaded.preprocess(image) for image in _images()])         # (2, 1 + 16, 3*8*8)
    assert packed.shape == (2, 17, 192)
    inputs = Siglip2ImageProcessor.from_pretrained(folder)(images=_images(), return_tensors="pt")
    assert not bool(inputs["pixel_attention_mask"].all())            # a 40x64 and a 64x32 image: padding
    assert inputs["spatial_shapes"][0].tolist() != inputs["spatial_shapes"][1].tolist()
    z_final, z_layers = loaded.readout(packed, [1, 3])
    # the loaded model's own modules: a copy read from disk can differ from `model` in the last bit on some CPUs
    # (same weights, other memory: oneDNN picks its kernels by alignment), so `model` is checked only by tolerance
    own_model = loaded.model
    with torch.no_grad():
        own = _embedding(own_model.get_image_features(**inputs))
        hidden = own_model.vision_model(**inputs, output_hidden_states=True).hidden_states
        vision = own_model.vision_model
        torch.testing.assert_close(_embedding(model.get_image_features(**inputs)), own, rtol=1e-5, atol=1e-6)
        expected = [vision.head(vision.post_layernorm(hidden[j]), inputs["pixel_attention_mask"]) for j in (1, 3)]
    assert torch.equal(z_final, own)
    for got, want in zip(z_layers, expected):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("which", ["clip_dir", pytest.param("siglip2_dir", marks=needs_siglip2)])
def test_classify_calibrate_and_evaluate_run_on_the_new_towers(which, request, tmp_path):
    from siglip_dola.evaluation.calibrate import calibrate
    from siglip_dola.evaluation.evaluate import evaluate

    folder, model = request.getfixturevalue(which)
    loaded = loading.load(str(folder), device="cpu")
    bank = build_text_bank(loaded, LABELS)
    results = DoLaSigLIP(loaded, mode="off").classify(_images(), bank, top_k=3)
    z_final, _ = loaded.readout(torch.stack([loaded.preprocess(image) for image in _images()]), [])
    cosine = torch.nn.functional.normalize(z_final, dim=-1) @ torch.nn.functional.normalize(bank.embeds, dim=-1).T
    assert [r["predictions"][0]["label"] for r in results] == [LABELS[i] for i in cosine.argmax(-1).tolist()]
    assert all(r["predictions"][0]["score"] == pytest.approx(r["predictions"][0]["baseline_score"]) for r in results)
    calibration = calibrate(loaded, "shapes", split="val", n=12, out=tmp_path / "calib.json", progress=False)
    report = evaluate(loaded, "shapes", split="test", calibration=calibration, n=12, progress=False)
    assert report["n_images"] == 12 and set(report["modes"]) >= {"off", "static", "dynamic"}


def test_from_model_open_clip_clip_model(tmp_path):
    """An open_clip CLIP with a VisionTransformer tower (the OpenAI/LAION layout) at a small size."""
    config = {"embed_dim": 24, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "sdola-clip-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    model = fill_random_(open_clip.create_model("sdola-clip-tiny", pretrained=None))
    assert isinstance(model.visual, VisionTransformer)
    loaded = loading.from_model(model, tokenizer=open_clip.SimpleTokenizer(context_length=16), model_id="tiny-clip")
    assert (loaded.backend, loaded.readout.backend, loaded.readout.head_path) == ("open_clip", "open_clip", "token")
    pixels = torch.stack([loaded.preprocess(image) for image in _images()])
    with torch.no_grad():
        assert torch.equal(loaded.readout(pixels, [2])[0], model.encode_image(pixels))
    results = DoLaSigLIP(loaded, layers=[1, 2, 3]).classify(_images(), LABELS, top_k=2)
    assert len(results) == 2 and results[0]["premature_layer"] in (1, 2, 3)


@pytest.mark.parametrize("name", ["ViT-L-14-336:openai", "openai/clip-vit-large-patch14-336",
                                  "hf-hub:timm/vit_large_patch14_clip_336.openai", "google/siglip2-base-patch16-naflex"])
def test_uncached_clip_family_names_fail_fast_offline(name, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(hub.HubUnavailableError, match="local directory.*HF_HOME"):
        loading.load(name, device="cpu")
    assert time.monotonic() - start < 30   # fails fast: no retries against a dead network


def test_unsupported_hf_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(ValueError, match="supported: \\['siglip', 'clip', 'siglip2'\\]"):
        loading.load(str(tmp_path), device="cpu")
