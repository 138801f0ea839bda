"""Text banks: open_clip-identical ensembling, label files, .npy/.safetensors, on-disk cache."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from siglip_dola import text_bank as tb
from siglip_dola.text_bank.bank import check_bank
from siglip_dola.loading import open_clip as open_clip_adapter
from siglip_dola.loading import LoadedModel, _wrap_text_encoder

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(open_clip model, tokenizer) built from a tiny registered config, random init, eval mode."""
    config_dir = tmp_path_factory.mktemp("oc_cfg")
    (config_dir / "sdola-bank-tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model = open_clip.create_model("sdola-bank-tiny", pretrained=None).eval()
    return model, open_clip.get_tokenizer("sdola-bank-tiny")


def _loaded(model, tokenizer, model_id="tiny") -> LoadedModel:
    """A LoadedModel around the real tiny model's text tower (no readout needed for banks)."""
    parts = open_clip_adapter.parts(model, preprocess=lambda image: image, tokenizer=tokenizer)
    cpu = torch.device("cpu")
    return LoadedModel(model_id=model_id, readout=None, preprocess=parts.preprocess,
                       encode_text=_wrap_text_encoder(parts.encode_text, cpu, torch.float32),
                       logit_scale=parts.logit_scale, logit_bias=parts.logit_bias, device=cpu,
                       dtype=torch.float32, model=model, backend="open_clip")


class CountingEncoder:
    """Wraps a real encode_text and counts how many texts it encoded."""

    def __init__(self, encode_text):
        self.encode_text, self.texts = encode_text, 0

    def __call__(self, texts):
        self.texts += len(texts)
        return self.encode_text(texts)


def test_ensembling_matches_open_clip(tiny_clip):
    model, tokenizer = tiny_clip
    classnames = ["cat", "dog", "red car", "tree", "a b"]
    bank = tb.build_text_bank(_loaded(model, tokenizer), classnames, tb.imagenet_templates()[:7], batch_size=4)
    reference = open_clip.build_zero_shot_classifier(
        model, tokenizer, classnames, OPENAI_IMAGENET_TEMPLATES[:7], num_classes_per_batch=2, device="cpu")
    assert bank.labels == classnames
    torch.testing.assert_close(bank.embeds, reference.T.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bank.embeds.norm(dim=-1), torch.ones(5))


def test_single_template_is_the_normalised_text_embedding(tiny_clip):
    model, tokenizer = tiny_clip
    bank = tb.build_text_bank(_loaded(model, tokenizer), ["cat", "dog"])
    with torch.no_grad():
        direct = model.encode_text(tokenizer(["cat", "dog"]))
    torch.testing.assert_close(bank.embeds, direct / direct.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_imagenet_metadata_comes_from_open_clip():
    names, templates = tb.imagenet_classnames(), tb.imagenet_templates()
    assert len(names) == 1000 and names == list(IMAGENET_CLASSNAMES)
    assert len(templates) == 80
    assert [t.format("goldfish") for t in templates] == [t("goldfish") for t in OPENAI_IMAGENET_TEMPLATES]


def test_cache_hit_and_invalidation(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    loaded = _loaded(model, tokenizer)
    counter = CountingEncoder(loaded.encode_text)
    loaded.encode_text = counter
    # 2 classes x 2 templates, + the 2 templates around the nonsense probe word (unread classes warn)
    first = tb.build_text_bank(loaded, ["cat", "dog"], ["a {}.", "the {}"], cache_dir=tmp_path)
    assert counter.texts == 4 + 2 and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = tb.build_text_bank(loaded, ["cat", "dog"], ["a {}.", "the {}"], cache_dir=tmp_path)
    assert counter.texts == 6  # served from disk
    torch.testing.assert_close(again.embeds, first.embeds)
    assert again.labels == first.labels and again.model_id == "tiny"
    tb.build_text_bank(loaded, ["cat", "dog"], ["a {}."], cache_dir=tmp_path)  # templates changed
    tb.build_text_bank(loaded, ["cat", "cow"], ["a {}.", "the {}"], cache_dir=tmp_path)  # texts changed
    assert counter.texts == 6 + (2 + 1) + (4 + 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cache_invalidated_when_weights_change(tiny_clip, tmp_path):
    import copy

    model, tokenizer = tiny_clip
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.text_projection.mul_(torch.linspace(0.5, 1.5, changed.text_projection.shape[1]))
    original = tb.build_text_bank(_loaded(model, tokenizer), ["cat", "dog"], cache_dir=tmp_path)
    loaded = _loaded(changed, tokenizer)  # same model_id, different weights
    counter = CountingEncoder(loaded.encode_text)
    loaded.encode_text = counter
    updated = tb.build_text_bank(loaded, ["cat", "dog"], cache_dir=tmp_path)
    assert counter.texts == 2 + 1 and len(list(tmp_path.glob("*.safetensors"))) == 2  # + the probe
    assert not torch.allclose(updated.embeds, original.embeds)


def test_build_rejects_bad_labels_and_text_free_models(tiny_clip):
    model, tokenizer = tiny_clip
    loaded = _loaded(model, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        tb.build_text_bank(loaded, [])
    with pytest.raises(ValueError, match="duplicate.*cat"):
        tb.build_text_bank(loaded, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="templates"):
        tb.build_text_bank(loaded, ["cat"], templates=[])
    loaded.encode_text = None
    with pytest.raises(ValueError, match="no text encoder"):
        tb.build_text_bank(loaded, ["cat"])


def test_read_labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffcat\n\n  dog  \r\ncafé\n   \n".encode("utf-8"))
    assert tb.read_labels_file(path) == ["cat", "dog", "café"]


@pytest.mark.parametrize("content, message", [
    ("café\n".encode("latin-1"), "not valid UTF-8"),
    (b"\n \n", "empty"),
    (b"cat\ndog\ncat\n", "duplicate labels: \\['cat'\\]"),
])
def test_read_labels_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad labels.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        tb.read_labels_file(path)
    assert str(path) in str(error.value)


def test_npy_round_trip_normalises_and_takes_labels(tmp_path):
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(3, 8)).astype(np.float32) * 5
    np.save(tmp_path / "bank.npy", embeds)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n", encoding="utf-8")
    bank = tb.load_text_bank(tmp_path / "bank.npy", labels=tmp_path / "labels.txt")
    expected = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    np.testing.assert_allclose(bank.embeds.numpy(), expected, rtol=1e-6)
    assert bank.labels == ["a", "b", "c"]
    assert tb.load_text_bank(tmp_path / "bank.npy").labels == ["0", "1", "2"]


def test_safetensors_round_trip_keeps_labels_and_model_id(tmp_path):
    embeds = torch.nn.functional.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    tb.save_text_bank(tb.TextBank(["x", "y"], embeds, "m"), tmp_path / "bank.safetensors")
    bank = tb.load_text_bank(tmp_path / "bank.safetensors")
    assert bank.labels == ["x", "y"] and bank.model_id == "m"
    torch.testing.assert_close(bank.embeds, embeds)


def test_bad_bank_files(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):  # numpy refuses: allow_pickle=False
        tb.load_text_bank(tmp_path / "objects.npy")
    np.save(tmp_path / "bank.npy", np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="3 labels|2 labels"):
        tb.load_text_bank(tmp_path / "bank.npy", labels=["a", "b"])
    with pytest.raises(ValueError, match=".safetensors or .npy"):
        tb.load_text_bank(tmp_path / "bank.pt")


def test_check_bank_dimension_against_the_readout():
    from timm.models.vision_transformer import VisionTransformer

    from siglip_dola.loading import from_model

    torch.manual_seed(0)
    tower = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False,
                              global_pool="map", num_classes=0).eval()
    loaded = from_model(tower, model_id="tower", logit_scale=math.log(100.0))
    check_bank(tb.TextBank(["a", "b"], torch.eye(2, 32), "tower"), loaded)
    with pytest.raises(ValueError, match="dimension 16 does not match .* 32"):
        check_bank(tb.TextBank(["a", "b"], torch.eye(2, 16), "tower"), loaded)
    check_bank(tb.TextBank(["a", "b"], torch.eye(2, 32), "other"), loaded)  # no text tower: any bank's origin
    with_text_tower = dataclasses.replace(loaded, encode_text=lambda texts: torch.ones(len(texts), 32))
    with pytest.raises(ValueError, match="encoded by model 'other'"):
        check_bank(tb.TextBank(["a", "b"], torch.eye(2, 32), "other"), with_text_tower)


# ---------------------------------------------------------------- silent wrong answers made loud
def test_embedded_model_warns_for_words_it_cannot_read():
    """The embedded tokenizer knows only the shapes vocabulary: "cat" and "dog" encode to the same unknown tokens."""
    from siglip_dola.loading import load

    model = load()
    with pytest.warns(UserWarning, match=r"2 of 3 classes are not read by the tokenizer.*'cat', 'dog'"):
        bank = tb.build_text_bank(model, ["cat", "dog", "red circle"])
    assert torch.allclose(bank.embeds[0], bank.embeds[1])  # the warning tells the truth
    with pytest.warns(UserWarning, match=r"1 of 2 classes are not read.*'cat'"):
        tb.build_text_bank(model, ["cat", "red circle"], templates=["a photo of a {}."])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the README's labels are read: no warning
        tb.build_text_bank(model, ["red circle", "blue square"], templates=["a photo of a {}."])


def test_single_label_warns(tiny_clip):
    with pytest.warns(UserWarning, match="at least 2 candidates"):
        tb.build_text_bank(_loaded(*tiny_clip), ["cat"])


@pytest.mark.parametrize("template,match", [("a photo", "does not use the class name"),
                                            ("a {} {}", "exactly one"), ("a {0} and {0}", "exactly one"),
                                            ("a {name}", "exactly one"), ("a {", "exactly one")])
def test_broken_templates_are_refused(tiny_clip, template, match):
    with pytest.raises(ValueError, match=match):
        tb.build_text_bank(_loaded(*tiny_clip), ["cat", "dog"], templates=[template])
    with pytest.raises(ValueError, match=match):
        tb.build_text_bank(_loaded(*tiny_clip), ["cat", "dog"], templates=["a photo of a {}.", template])


def test_bank_files_hostile_contents(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([[1.0, 2.0], None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="objects.npy cannot be read"):
        tb.load_text_bank(tmp_path / "objects.npy", labels=["a", "b"])
    np.save(tmp_path / "nan.npy", np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 0.0]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"rows \[1, 2\] are NaN, infinite or all zero"):
        tb.load_text_bank(tmp_path / "nan.npy", labels=["a", "b", "c"])
    np.save(tmp_path / "vector.npy", np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected \[C, D\]"):
        tb.load_text_bank(tmp_path / "vector.npy", labels=["a"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="junk.safetensors cannot be read"):
        tb.load_text_bank(tmp_path / "junk.safetensors")
    np.save(tmp_path / "same.npy", np.array([[1.0, 0.0], [2.0, 0.0]], dtype=np.float32))
    with pytest.warns(UserWarning, match="identical text embeddings"):
        tb.load_text_bank(tmp_path / "same.npy", labels=["a", "b"])
