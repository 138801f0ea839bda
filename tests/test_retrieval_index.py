"""Retrieval index: stored vectors vs the HF SiglipModel's own modules, manifest, add == build, crash safety."""
import dataclasses
import hashlib
import json

import numpy as np
import pytest

from siglip_dola.embedding.images import embed_images
from siglip_dola.loading import load
from siglip_dola.retrieval import add_to_index, build_index, index as index_module, open_index, storage
from tiny_index import reference_vectors, save_tiny_siglip
from siglip_dola.index_options import StoreOptions

LAYERS = [2, 4]
FP16 = StoreOptions(layer_store="fp16")


def stored_by_path(index):
    vectors = index.vectors(np.arange(len(index)), list(range(1 + len(index.layers))))  # (1+J, n, D)
    return {path: vectors[:, i] for i, path in enumerate(index.paths)}


# ---------------------------------------------------------------- tests
def test_build_stores_the_models_own_embeddings_and_a_manifest(model, images, tmp_path):
    manifest = build_index([images], tmp_path / "idx", model, layers=LAYERS, chunk_size=3, progress=False)
    index = open_index(tmp_path / "idx", model, layers=LAYERS)
    good = sorted(str(p.resolve()) for p in images.glob("img_*.png"))
    assert sorted(index.paths) == good and manifest.count == len(good) == len(index)
    reference = reference_vectors(model, index.paths, LAYERS)
    stored = index.vectors(np.arange(len(index)), [0, 1, 2]).transpose(1, 0, 2)  # (n, 1+J, D)
    # the default int8+int4 store: within half a step of the model's own vectors, max |x| / 127 per vector for the
    # final row (int8), max |x| / 7 for the layer rows (int4)
    bound = np.abs(reference).max(axis=-1, keepdims=True) / np.array([254, 14, 14])[:, None] + 5e-4
    assert np.all(np.abs(stored - reference) <= bound)
    on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk["model_id"] == model.model_id and on_disk["layers"] == LAYERS
    assert on_disk["count"] == len(good) and on_disk["format_version"] == storage.FORMAT_VERSION
    assert on_disk["embed_dim"] == 16 and on_disk["num_layers"] == 6 and "image_size=(64, 64)" in on_disk["preprocessing"]
    # the preprocessing is described by its settings (as the model's own processor holds them), never a memory address
    processor = model.preprocess.processor
    assert f"image_mean={processor.image_mean!r}" in on_disk["preprocessing"] and " at 0x" not in on_disk["preprocessing"]
    digest = hashlib.sha256()
    for seg in on_disk["segments"]:
        folder = tmp_path / "idx" / "segments" / seg["name"]  # the int8+int4 store's files, in order
        files = ("final-int8.npy", "final-scales.npy", "layers-int4.npy", "layers-scales.npy")
        file_hash = hashlib.sha256(b"".join((folder / name).read_bytes() for name in files)).hexdigest()
        assert file_hash == seg["sha256"]
        digest.update(f"{seg['name']}:{file_hash}\n".encode())
    assert on_disk["checksum"] == digest.hexdigest()
    assert index.faiss_index.ntotal == len(good)


def test_bucket_selects_the_stored_layers(model, images, tmp_path):
    manifest = build_index([images / "img_00.png"], tmp_path / "idx", model, bucket=2, progress=False)
    assert manifest.layers == [4]  # N=6, buckets [1,2],[3,4],[5,6]: even layers of bucket 2
    # the default for N=6: the last bucket [5, 6] has no even layer below N, so it gives its other one (issue #26)
    assert build_index([images / "img_00.png"], tmp_path / "idx2", model, progress=False).layers == [5]


def test_corrupt_images_are_skipped_and_listed(model, images, tmp_path):
    manifest = build_index([images], tmp_path / "idx", model, layers=LAYERS, progress=False)
    broken = str((images / "broken.png").resolve())
    assert [path for path, _ in manifest.skipped] == [broken]
    assert broken not in open_index(tmp_path / "idx").paths
    listed = json.loads((tmp_path / "idx" / "manifest.json").read_text())["skipped"]
    assert listed[0][0] == broken and listed[0][1]  # the error text is kept


def test_incremental_add_equals_one_shot_build(model, images, tmp_path):
    paths = sorted(images.glob("img_*.png"))
    build_index(paths[:3], tmp_path / "inc", model, layers=LAYERS, chunk_size=2, progress=False)
    add_to_index(tmp_path / "inc", paths[1:5], model, chunk_size=2, progress=False)  # 1, 2 already indexed
    manifest = add_to_index(tmp_path / "inc", [images], model, progress=False)
    build_index([images], tmp_path / "one", model, layers=LAYERS, progress=False)
    incremental, one_shot = open_index(tmp_path / "inc"), open_index(tmp_path / "one")
    assert manifest.count == len(paths) and len(set(incremental.paths)) == len(paths)
    inc_vectors, one_vectors = stored_by_path(incremental), stored_by_path(one_shot)
    assert inc_vectors.keys() == one_vectors.keys()
    for path, vectors in inc_vectors.items():
        np.testing.assert_allclose(vectors, one_vectors[path], atol=2e-3)
    assert [p for p, _ in manifest.skipped] == [str((images / "broken.png").resolve())]
    assert add_to_index(tmp_path / "inc", [images / "img_00.png"], model).count == len(paths)  # nothing new


class Crash(RuntimeError):
    pass


def _crashing_embed(after_calls, calls):
    def embed(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) > after_calls:
            raise Crash("simulated crash mid-build")
        return embed_images(*args, **kwargs)
    return embed


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and storage.STAGING not in p.parts}


def test_interrupted_build_keeps_previous_index_and_resumes(model, images, tmp_path, monkeypatch):
    paths = sorted(images.glob("img_*.png"))
    build_index(paths[:2], tmp_path / "idx", model, layers=LAYERS, progress=False, store_options=FP16)
    before = _snapshot(tmp_path / "idx")
    calls = []
    monkeypatch.setattr(index_module, "embed_images", _crashing_embed(1, calls))
    with pytest.raises(Crash):
        build_index(paths, tmp_path / "idx", model, layers=LAYERS, chunk_size=2, progress=False, overwrite=True, store_options=FP16)
    assert _snapshot(tmp_path / "idx") == before  # the previous index is untouched
    assert sorted(open_index(tmp_path / "idx").paths) == [str(p.resolve()) for p in paths[:2]]
    calls.clear()
    monkeypatch.setattr(index_module, "embed_images", _crashing_embed(99, calls))
    manifest = build_index(paths, tmp_path / "idx", model, layers=LAYERS, chunk_size=2, progress=False,
                           overwrite=True, store_options=FP16)
    # chunk 1 = the old index's segment (an fp16 store keeps the vectors to reuse), chunk 2 staged before the crash
    assert calls == [2, 1]
    assert manifest.count == len(paths) and not (tmp_path / "idx" / storage.STAGING).exists()
    fresh = build_index(paths, tmp_path / "fresh", model, layers=LAYERS, chunk_size=2, progress=False, store_options=FP16)
    assert manifest.checksum == fresh.checksum  # resumed == built in one go
    assert len(list((tmp_path / "idx" / "segments").iterdir())) == len(manifest.segments)  # old ones removed


def test_crash_before_the_manifest_commit_keeps_previous_index(model, images, tmp_path, monkeypatch):
    paths = sorted(images.glob("img_*.png"))
    build_index(paths[:2], tmp_path / "idx", model, layers=LAYERS, progress=False)
    before = json.loads((tmp_path / "idx" / "manifest.json").read_text())

    def fail(*args):
        raise Crash("crash while committing")
    monkeypatch.setattr(storage, "write_manifest", fail)
    with pytest.raises(Crash):
        add_to_index(tmp_path / "idx", paths, model, progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text()) == before
    assert len(open_index(tmp_path / "idx")) == 2  # old FAISS file and segments still there
    calls = []
    monkeypatch.setattr(index_module, "embed_images", _crashing_embed(99, calls))
    assert add_to_index(tmp_path / "idx", paths, model, progress=False).count == len(paths)
    assert calls == []  # the segment written before the crash is reused


def test_other_model_or_layers_are_refused(model, images, tmp_path):
    build_index([images / "img_00.png"], tmp_path / "idx", model, layers=LAYERS, progress=False)
    renamed = dataclasses.replace(model, model_id="some/other-name")  # the same weights under another name
    assert len(open_index(tmp_path / "idx", renamed)) == 1
    other = load(save_tiny_siglip(tmp_path / "other", seed=1), device="cpu")  # other weights
    with pytest.raises(ValueError, match="built with model"):
        open_index(tmp_path / "idx", other)
    with pytest.raises(ValueError, match="built with model"):
        add_to_index(tmp_path / "idx", [images / "img_01.png"], other)
    with pytest.raises(ValueError, match=r"stores layers \[2, 4\]"):
        open_index(tmp_path / "idx", model, layers=[3])


def test_bad_arguments_and_corruption(model, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="no index"):
        open_index(tmp_path / "missing")
    with pytest.raises(ValueError, match="chunk_size"):
        build_index([images], tmp_path / "idx", model, layers=LAYERS, chunk_size=0)
    with pytest.raises(ValueError, match="layers"):
        build_index([images], tmp_path / "idx", model, layers=[6])
    manifest = build_index([images / "img_00.png"], tmp_path / "idx", model, layers=LAYERS, progress=False)
    vectors = tmp_path / "idx" / "segments" / manifest.segments[0]["name"] / "layers-int4.npy"
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        open_index(tmp_path / "idx", verify=True)


def test_build_stores_its_settings_and_the_layers_they_need(model, images, tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"model": model.model_id, "task": "zeroshot_retrieval",
                                 "choice": {"mode": "static", "static_layer": 2, "alpha": 0.2, "contrast_weight": 0.5}}))
    manifest = build_index([images / "img_00.png"], tmp_path / "idx", model, calibration=calib, progress=False)
    assert manifest.layers == [2]  # only what the calibration reads
    assert manifest.settings == {"mode": "static", "layers": [2], "static_layer": 2, "alpha": 0.2,
                                 "contrast_weight": 0.5, "bucket": None, "n_buckets": None, "calibration": str(calib),
                                 "sources": dict.fromkeys(("mode", "alpha", "contrast_weight", "layers"), "calibration")}
    assert storage.read_manifest(tmp_path / "idx").settings == manifest.settings
    flagged = build_index([images / "img_00.png"], tmp_path / "idx2", model, calibration=calib, layers=[2, 4],
                          mode="dynamic", progress=False)
    assert flagged.layers == [2, 4] and flagged.settings["sources"]["layers"] == "flag"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": model.model_id, "choice": {"mode": "static", "static_layer": 4}}))
    with pytest.raises(ValueError, match=r"stores layers \[2\], but the settings need layers \[4\]"):
        add_to_index(tmp_path / "idx", [images], model, calibration=other, progress=False)
    from siglip_dola.retrieval.index import index_settings
    searched = index_settings(storage.read_manifest(tmp_path / "idx"))
    assert (searched.mode, searched.layers, searched.alpha, searched.sources) == \
        ("static", [2], 0.2, manifest.settings["sources"])  # a search without flags uses the stored settings
