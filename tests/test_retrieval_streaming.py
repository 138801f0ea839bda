"""Stores without a codec are encoded as each chunk is written: only the final rows are staged in fp16, and a
resumed build reuses a staged chunk only for the store it was encoded into."""
import numpy as np
import pytest

from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval import build_index, index as index_module, open_index, storage
from siglip_dola.retrieval.from_vectors import build_index_from_vectors
from test_retrieval_index import Crash, _crashing_embed
from tiny_index import reference_vectors

LAYERS = [2, 4]


def _staged(root):
    return sorted((root / storage.STAGING).glob("seg-*"))


def _crash_after_the_first_chunk(model, paths, root, monkeypatch) -> list:
    """An int8+int4 build of `paths` in chunks of 3 that dies embedding its second chunk; the embed calls."""
    calls = []
    monkeypatch.setattr(index_module, "embed_images", _crashing_embed(1, calls))
    with pytest.raises(Crash):
        build_index(paths, root, model, layers=LAYERS, chunk_size=3, progress=False,
                    store_options=StoreOptions(layer_store="int8+int4"))
    return calls


def test_a_streamed_chunk_stages_its_final_rows_and_its_store(model, images, tmp_path, monkeypatch):
    paths = sorted(images.glob("img_*.png"))
    calls = _crash_after_the_first_chunk(model, paths, tmp_path / "idx", monkeypatch)
    (folder,) = _staged(tmp_path / "idx")
    staged = np.load(folder / "vectors.npy", allow_pickle=False)
    reference = reference_vectors(model, [str(p.resolve()) for p in paths[:3]], LAYERS)  # (n, 1+J, D), unit
    assert staged.dtype == np.float16 and staged.shape == (3, 1, reference.shape[2])  # the final rows only
    np.testing.assert_allclose(staged[:, 0].astype(np.float64), reference[:, 0], atol=1e-3)
    # the store's own bytes, read with the format's definition (int8: x = code * scale; int4: two signed nibbles
    # a byte, offset 8, even dimension high), within half a step of the model's own vectors
    codes, scales = np.load(folder / "final-int8.npy"), np.load(folder / "final-scales.npy")
    np.testing.assert_allclose(codes[:, 0] * scales[:, 0, None], reference[:, 0],
                               atol=float(scales.max()) / 2 + 1e-3)
    packed, layer_scales = np.load(folder / "layers-int4.npy"), np.load(folder / "layers-scales.npy")
    nibbles = np.stack([(packed >> 4).astype(np.int64) - 8, (packed & 15).astype(np.int64) - 8], axis=-1)
    layers = nibbles.reshape(*packed.shape[:2], -1) * layer_scales[..., None]
    np.testing.assert_allclose(layers, reference[:, 1:], atol=float(layer_scales.max()) / 2 + 1e-3)
    assert (folder / "checksums.npy").is_file()

    calls.clear()  # resumed with the same store: the staged chunk is reused, and the result is a fresh build's
    monkeypatch.setattr(index_module, "embed_images", _crashing_embed(99, calls))
    resumed = build_index(paths, tmp_path / "idx", model, layers=LAYERS, chunk_size=3, progress=False,
                          store_options=StoreOptions(layer_store="int8+int4"))
    assert calls == [3, 1]
    fresh = build_index(paths, tmp_path / "fresh", model, layers=LAYERS, chunk_size=3, progress=False,
                        store_options=StoreOptions(layer_store="int8+int4"))
    assert resumed.checksum == fresh.checksum
    assert not (tmp_path / "idx" / storage.STAGING).exists()
    for seg in resumed.segments:  # the staged fp16 final rows are gone once committed
        assert not (tmp_path / "idx" / storage.SEGMENTS / seg["name"] / "vectors.npy").exists()


@pytest.mark.parametrize("other", ["int8", "fp16", "int4"])
def test_a_chunk_streamed_for_one_store_is_embedded_again_for_another(model, images, tmp_path, monkeypatch, other):
    paths = sorted(images.glob("img_*.png"))
    calls = _crash_after_the_first_chunk(model, paths, tmp_path / "idx", monkeypatch)
    calls.clear()
    monkeypatch.setattr(index_module, "embed_images", _crashing_embed(99, calls))
    resumed = build_index(paths, tmp_path / "idx", model, layers=LAYERS, chunk_size=3, progress=False,
                          store_options=StoreOptions(layer_store=other))
    assert calls == [3, 3, 1]  # its final rows alone cannot make another store: embedded again
    assert resumed.layer_store == other and resumed.count == len(paths)
    index = open_index(tmp_path / "idx")
    reference = reference_vectors(model, index.paths, LAYERS)
    stored = index.vectors(np.arange(len(index)), [0, 1, 2]).transpose(1, 0, 2)
    tolerance = {"int8": 1 / 254, "fp16": 1e-3, "int4": 1 / 14}[other]  # half a step of each format
    assert np.abs(stored - reference).max() <= tolerance + 1e-3


def test_from_vectors_streams_a_generator_once(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((50, 3, 32)).astype(np.float32) for _ in range(3)]
    seen = []

    def gallery():
        for number, vectors in enumerate(chunks):
            seen.append(number)
            # every chunk arrives after the one before was written: staged final rows, store already encoded
            assert all((f / "final-int8.npy").is_file() for f in _staged(tmp_path / "idx"))
            yield [f"img/{number}-{i}.jpg" for i in range(50)], vectors
    manifest = build_index_from_vectors(tmp_path / "idx", gallery(), model_id="synthetic", layers=[1, 2],
                                        num_layers=4, logit_scale=4.6, store_options=StoreOptions(layer_store="int8+int4"))
    assert seen == [0, 1, 2] and manifest.count == 150
    unit = np.concatenate(chunks) / np.linalg.norm(np.concatenate(chunks), axis=-1, keepdims=True)
    index = open_index(tmp_path / "idx")
    stored = index.vectors(np.arange(150), [0]).transpose(1, 0, 2)[:, 0]
    np.testing.assert_allclose(stored, unit[:, 0], atol=1 / 254 + 1e-3)
