"""embed_images vs the HF SiglipModel's own modules: one readout call per batch, order kept, bad images skipped."""
import dataclasses

import pytest
import torch
from PIL import Image

from siglip_dola.data import shapes
from tools import train_embedded as te
from conftest import CountingReadout
from siglip_dola.embedding.images import embed_images
from siglip_dola.embedding.texts import embed_texts
from siglip_dola.embedding.pixel_batches import iter_pixel_batches



def naive_embeddings(tiny_hf_siglip, images, layers):
    """(z_final [n, D], z_layers [J, n, D]) from the model's own vision modules, one image at a time."""
    vision = tiny_hf_siglip.vision_model
    finals, stacks = [], []
    with torch.no_grad():
        for image in images:
            pixels = te.pixels_from_images([image])
            out = vision(pixel_values=pixels, output_hidden_states=True)
            finals.append(out.pooler_output)  # the model's own image embedding
            stacks.append(torch.stack([vision.head(vision.post_layernorm(out.hidden_states[j])) for j in layers]))
    return torch.cat(finals), torch.cat(stacks, dim=1)


def test_pairs_match_model_modules_with_one_readout_call_per_batch(tiny_hf_siglip, tiny_loaded):
    samples = shapes.make_split("val", n=7)
    layers = [2, 5, 11]
    counting = dataclasses.replace(tiny_loaded, readout=CountingReadout(tiny_loaded.readout))
    result = embed_images(counting, [(s.name, s.image) for s in samples], layers, batch_size=3, progress=False)
    assert counting.readout.calls == 3  # ceil(7 / 3): final + all layers in one call per batch
    z_final, z_layers = naive_embeddings(tiny_hf_siglip, [s.image for s in samples], layers)
    assert result.z_final.dtype == torch.float32 and result.z_final.device.type == "cpu"
    assert result.z_layers.shape == (3, 7, 16)
    torch.testing.assert_close(result.z_final, z_final, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.z_layers, z_layers, rtol=1e-4, atol=1e-5)
    assert result.ids == [s.name for s in samples] and result.indices == list(range(7))
    assert result.layers == layers and result.skipped == []


@pytest.mark.parametrize("workers", [0, 2])
def test_paths_keep_order_and_skip_bad_files(tiny_hf_siglip, tiny_loaded, tmp_path, workers):
    samples = shapes.make_split("test", n=5)
    paths = []
    for s in samples:
        paths.append(tmp_path / f"{s.name}.png")
        s.image.save(paths[-1])
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    items = [paths[0], tmp_path / "corrupt.png", paths[1], tmp_path / "missing.png", paths[2], paths[3], paths[4]]
    result = embed_images(tiny_loaded, [str(p) for p in items], [4], batch_size=2, progress=False, workers=workers)
    assert result.ids == [str(p) for p in paths]
    assert result.indices == [0, 2, 4, 5, 6]
    assert [s[0] for s in result.skipped] == [str(tmp_path / "corrupt.png"), str(tmp_path / "missing.png")]
    assert all(isinstance(err, str) and err for _, err in result.skipped)
    z_final, z_layers = naive_embeddings(tiny_hf_siglip, [s.image for s in samples], [4])
    torch.testing.assert_close(result.z_final, z_final, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.z_layers, z_layers, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_pair_is_reported_and_skipped(tiny_loaded, workers):
    good = shapes.make_split("val", n=2)
    items = [(good[0].name, good[0].image), ("broken", "not an image"), (good[1].name, good[1].image)]
    result = embed_images(tiny_loaded, items, [2], batch_size=1, progress=False, workers=workers)
    assert result.ids == [good[0].name, good[1].name] and result.indices == [0, 2]
    assert [s[0] for s in result.skipped] == ["broken"]


def test_all_bad_gives_empty_embeddings(tiny_loaded):
    result = embed_images(tiny_loaded, [("a", None), ("b", 3)], [2, 4], progress=False)
    assert result.z_final.shape == (0, 16) and result.z_layers.shape == (2, 0, 16)
    assert [s[0] for s in result.skipped] == ["a", "b"]


def _hooks(model):
    """Every forward (pre-)hook registered on any module (transformers installs its own capture hooks)."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, hooks in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hooks}


def test_model_left_unchanged(tiny_hf_siglip, tiny_loaded):
    before = {k: v.clone() for k, v in tiny_hf_siglip.state_dict().items()}
    hooks_before = _hooks(tiny_hf_siglip)
    embed_images(tiny_loaded, [(s.name, s.image) for s in shapes.make_split("val", n=2)], [1, 3], progress=False)
    after = tiny_hf_siglip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _hooks(tiny_hf_siglip) == hooks_before
    assert not tiny_hf_siglip.training


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(tiny_loaded, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(tiny_loaded, [], [2], batch_size=batch_size)


def test_single_path_string_rejected(tiny_loaded):
    with pytest.raises(TypeError, match="items"):
        embed_images(tiny_loaded, "image.png", [2])
    with pytest.raises(TypeError, match="items"):
        embed_images(tiny_loaded, [Image.new("RGB", (4, 4))], [2])


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_match_the_naive_loop_in_input_order(tiny_hf_siglip, tiny_loaded, workers):
    """Decoding in worker processes changes nothing: same embeddings as the model's own forward, same order."""
    samples = shapes.make_split("test", n=11)
    items = [(s.name, s.image) for s in samples]
    items[3], items[8] = ("bad-3", None), ("bad-8", b"bytes")
    layers = [1, 6, 11]
    counting = dataclasses.replace(tiny_loaded, readout=CountingReadout(tiny_loaded.readout))
    # batch 4 with workers: decoded as sub-batches of 1, put back together as batches of 4 input items
    result = embed_images(counting, items, layers, batch_size=4, progress=False, workers=workers)
    assert counting.readout.calls == 3  # ceil(11 / 4)
    kept = [i for i in range(11) if i not in (3, 8)]
    z_final, z_layers = naive_embeddings(tiny_hf_siglip, [samples[i].image for i in kept], layers)
    assert result.indices == kept and result.ids == [samples[i].name for i in kept]
    assert [s[0] for s in result.skipped] == ["bad-3", "bad-8"]
    torch.testing.assert_close(result.z_final, z_final, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.z_layers, z_layers, rtol=1e-4, atol=1e-5)


def test_iter_pixel_batches_on_a_tensor_keeps_positions(tiny_loaded):
    pixels = torch.randn(5, 3, 32, 32)
    batches = list(iter_pixel_batches(tiny_loaded, pixels, batch_size=2))
    assert [b.indices for b in batches] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(torch.cat([b.pixels for b in batches]), pixels, rtol=0, atol=0)


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_bad_workers(tiny_loaded, workers):
    with pytest.raises(ValueError, match="workers"):
        embed_images(tiny_loaded, [("a", Image.new("RGB", (8, 8)))], [2], workers=workers)


def test_embed_texts_matches_the_text_tower_one_text_at_a_time(tiny_hf_siglip, tiny_loaded):
    tokenizer = te.build_tokenizer()
    max_length = tiny_hf_siglip.config.text_config.max_position_embeddings
    texts = ["a red circle", "a photo of a blue square", "green", "a b c d", "triangle"]
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer([text], padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt")["input_ids"]
            out = tiny_hf_siglip.get_text_features(input_ids=ids)
            rows.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    naive = torch.cat(rows)
    got = embed_texts(tiny_loaded, texts, batch_size=2)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (5, 16)
    torch.testing.assert_close(got, naive, rtol=1e-4, atol=1e-5)


def test_embed_texts_without_a_text_tower_names_the_use(tiny_loaded):
    vision_only = dataclasses.replace(tiny_loaded, encode_text=None)
    with pytest.raises(ValueError, match="no text tower: caption search"):
        embed_texts(vision_only, ["a"], needed_for="caption search")
