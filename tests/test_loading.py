"""load()/from_model(): local HF folders, open_clip checkpoints/folders, Hub cache, offline failure, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from siglip_dola import loading
from siglip_dola.loading import hub

OC_NAME = "sdola-oc-tiny"  # no "siglip" in the name: open_clip would fetch a SigLIP vocab from the web
OC_CONFIG = {
    "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 32, "timm_model_name": "sdola_test_vit_tiny_map", "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
}
HF_VOCAB = ["<pad>", "<unk>", "</s>", "a", "photo", "of", "cat", "dog", "red", "car"]


@register_model
def sdola_test_vit_tiny_map(pretrained=False, **kwargs):
    """A 4-block SigLIP-style timm ViT (no class token, MAP head) at 32x32."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, class_token=False,
                global_pool="map", num_classes=0)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return VisionTransformer(**{**args, **kwargs})


@pytest.fixture(scope="module")
def oc_model(tmp_path_factory):
    config_dir = tmp_path_factory.mktemp("oc_cfg")
    (config_dir / f"{OC_NAME}.json").write_text(json.dumps(OC_CONFIG))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    return open_clip.create_model(OC_NAME, pretrained=None).eval()


def _save_hf(folder, seed=0):
    """A tiny random SiglipModel + WordLevel tokenizer + SiglipImageProcessor in save_pretrained layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(HF_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                           image_size=32, patch_size=8))
    model = SiglipModel(config).eval()
    model.save_pretrained(folder)
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(HF_VOCAB)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tiny")
    model, tokenizer = _save_hf(folder)
    return folder, model, tokenizer


def _image(seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _embedding(output):
    """transformers 4.x returns the embedding tensor, 5.x an output object holding it as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _hf_text(model, tokenizer, texts):
    ids = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return _embedding(model.get_text_features(input_ids=ids))


def test_load_hf_folder(hf_dir):
    from transformers import SiglipImageProcessor

    folder, model, tokenizer = hf_dir
    loaded = loading.load(str(folder), device="cpu")
    assert loaded.model_id == str(folder.resolve()) and loaded.backend == "hf"
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.readout.num_layers == 4 and loaded.readout.embed_dim == 32
    assert loaded.logit_scale == pytest.approx(float(model.logit_scale.detach()))
    assert loaded.logit_bias == pytest.approx(float(model.logit_bias.detach()))
    assert loaded.tau == pytest.approx(1 / math.exp(float(model.logit_scale.detach())))
    pixels = loaded.preprocess(_image())
    reference_pixels = SiglipImageProcessor(size={"height": 32, "width": 32})(_image(), return_tensors="pt")
    torch.testing.assert_close(pixels, reference_pixels["pixel_values"][0])
    texts = ["a photo of a cat", "red car", "dog"]
    torch.testing.assert_close(loaded.encode_text(texts), _hf_text(model, tokenizer, texts))
    z_final, _ = loaded.readout(pixels[None], [2])
    with torch.no_grad():
        torch.testing.assert_close(z_final, _embedding(model.get_image_features(pixel_values=pixels[None])))


def test_default_loads_embedded_folder(hf_dir, monkeypatch):
    monkeypatch.setattr(loading, "EMBEDDED_DIR", hf_dir[0])
    for name in (None, "embedded"):
        assert loading.load(name, device="cpu").model_id == "embedded"
    monkeypatch.setattr(loading, "EMBEDDED_DIR", hf_dir[0] / "missing")
    with pytest.raises(FileNotFoundError, match="embedded"):
        loading.load()


def test_load_open_clip_checkpoint_safetensors_and_pt(oc_model, tmp_path):
    state = {k: v.contiguous() for k, v in oc_model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    tokenizer = open_clip.get_tokenizer(OC_NAME)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_ref, image_ref = oc_model.encode_text(tokenizer(["a cat", "a dog"])), oc_model.encode_image(pixels)
    for file in ("w.safetensors", "w.pt"):
        loaded = loading.load(f"{OC_NAME}:{tmp_path / file}", device="cpu")
        assert loaded.model_id == f"{OC_NAME}:{tmp_path / file}" and loaded.backend == "open_clip"
        torch.testing.assert_close(loaded.encode_text(["a cat", "a dog"]), text_ref)
        torch.testing.assert_close(loaded.readout(pixels, [2])[0], image_ref)
        assert loaded.preprocess(_image()).shape == (3, 32, 32)
        assert loaded.logit_scale == pytest.approx(float(oc_model.logit_scale.detach()))


class NotATensor:
    pass


def test_pickled_objects_are_refused(oc_model, tmp_path):
    torch.save({"payload": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        loading.load(f"{OC_NAME}:{tmp_path / 'evil.pt'}", device="cpu")


def test_load_open_clip_folder(oc_model, tmp_path):
    config = {"model_cfg": OC_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in oc_model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    loaded = loading.load(tmp_path, device="cpu")
    reference = open_clip.image_transform(32, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(loaded.preprocess(_image()), reference(_image()))  # preprocess_cfg honoured
    with torch.no_grad():
        ref = oc_model.encode_text(open_clip.get_tokenizer(OC_NAME)(["red car"]))
    torch.testing.assert_close(loaded.encode_text(["red car"]), ref)


def test_from_model_open_clip_and_hf_leave_the_model_alone(oc_model, hf_dir):
    _, hf_model, hf_tokenizer = hf_dir
    cases = [(oc_model, open_clip.get_tokenizer(OC_NAME), "open_clip"), (hf_model, hf_tokenizer, "hf")]
    for model, tokenizer, backend in cases:
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loaded = loading.from_model(model, tokenizer=tokenizer, model_id="mine")
        assert loaded.backend == backend and loaded.model_id == "mine" and loaded.model is model
        assert loaded.encode_text(["a cat"]).shape == (1, 32)
        assert loaded.preprocess(_image()).shape == (3, 32, 32)
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        model.eval()


def test_from_model_vision_only_tower():
    torch.manual_seed(0)
    tower = timm.create_model("sdola_test_vit_tiny_map", pretrained=False).eval()
    loaded = loading.from_model(tower, logit_scale=math.log(50.0))
    assert loaded.backend == "timm" and loaded.encode_text is None
    assert loaded.tau == pytest.approx(1 / 50.0) and loaded.logit_bias == 0.0
    assert loaded.preprocess(_image()).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="logit_scale is needed"):  # a guessed temperature never passes
        loading.from_model(tower)
    assert loaded.sources == {"vision": "timm:VisionTransformer", "head": "timm:VisionTransformer", "text": None,
                              "logit_scale": "explicit", "logit_bias": "none (0.0; the softmax does not use it)"}
    with pytest.raises(TypeError, match="tokenizer"):
        loading.from_model(tower, tokenizer=object())


def test_hub_id_loads_from_local_cache_without_network(hf_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-siglip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _save_hf(repo / "snapshots" / commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("network probed despite cache"))
    loaded = loading.load("someone/tiny-siglip", device="cpu")
    assert loaded.model_id == "someone/tiny-siglip" and loaded.backend == "hf"


@pytest.mark.parametrize("name", ["google/siglip-large-patch16-384", "hf-hub:timm/ViT-L-16-SigLIP-384",
                                  "ViT-L-16-SigLIP-384:webli"])
@pytest.mark.parametrize("offline_flag", ["1", None])
def test_uncached_hub_model_fails_with_local_weights_hint(name, offline_flag, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(hub.HubUnavailableError, match="local directory.*HF_HOME"):
        loading.load(name, device="cpu")


@pytest.mark.parametrize("name, error, match", [
    ("definitely not a model", ValueError, "accepted forms"),
    ("ViT-L-16-SigLIP-384:nosuchtag", ValueError, "valid tags: \\['webli'\\]"),
    ("ViT-L-16-SigLIP-384:/no/such/file.safetensors", FileNotFoundError, "checkpoint not found"),
    (42, TypeError, "name_or_path"),
])
def test_bad_names(name, error, match):
    with pytest.raises(error, match=match):
        loading.load(name, device="cpu")


def test_bad_local_paths_devices_and_precisions(tmp_path, hf_dir):
    with pytest.raises(ValueError, match="neither config.json"):
        loading.load(tmp_path, device="cpu")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="which architecture"):
        loading.load(tmp_path / "w.safetensors", device="cpu")
    with pytest.raises(ValueError, match="bf16.*fp16.*fp32"):
        loading.load(hf_dir[0], device="cpu", precision="int8")
    with pytest.raises(ValueError, match="torch device"):
        loading.load(hf_dir[0], device="gpu0")
    assert loading.resolve_precision(None, torch.device("cuda")) == torch.bfloat16
    assert loading.resolve_precision(None, torch.device("cpu")) == torch.float32


def test_naflex_siglip2_folder_without_safetensors_is_refused(tmp_path):
    # NaFlex 'siglip2' folders load (tests/test_loading_clip.py), from safetensors only
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="only safetensors weights"):
        loading.load(tmp_path, device="cpu")
