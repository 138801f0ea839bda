"""Index integrity and safety: corruption detected and named, no silent overwrite or empty index, moved
image folders, weights identity by content, one writer at a time, a full disk loses nothing."""
import errno
import json
import shutil

import pytest

from siglip_dola.cli import main
from siglip_dola.retrieval import (IndexCorruptError, add_to_index, build_index, faiss_store, open_index, search,
                                   storage, verify_index)
from tiny_index import write_images
from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval.layer_store import LayerStore

LAYERS = [2, 4]
FP16 = StoreOptions(layer_store="fp16")


@pytest.fixture
def built(model, images, tmp_path):
    """A fresh 7-image index (one corrupt file skipped) in tmp_path/idx."""
    build_index([images], tmp_path / "idx", model, layers=LAYERS, chunk_size=4, progress=False)
    return tmp_path / "idx"


def _flip(path, offset: int, n: int = 8):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


def _first_vectors(root):
    """The first segment's first layer-store file (vectors.npy for fp16, final-int8.npy for the default int8+int4)."""
    manifest = storage.read_manifest(root)
    name = LayerStore(manifest.layer_store, 1 + len(manifest.layers), manifest.embed_dim).files[0][0]
    return root / "segments" / manifest.segments[0]["name"] / name


def _faiss_file(root):
    return root / storage.read_manifest(root).faiss_file


def test_faiss_flip_is_caught_on_every_open(built, model, capsys):
    path = _faiss_file(built)
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(IndexCorruptError, match=path.name) as caught:
        open_index(built)
    assert "rebuild" in str(caught.value) and "--overwrite" in str(caught.value)
    assert main(["search", str(built), "a red circle"]) == 2
    err = capsys.readouterr().err
    assert path.name in err and "Traceback" not in err


def test_vectors_flip_is_caught_by_verify(built, capsys):
    path = _first_vectors(built)
    _flip(path, path.stat().st_size - 40)  # inside the data: size and header stay valid
    assert len(open_index(built)) == 7  # the cheap check reads no data
    with pytest.raises(IndexCorruptError, match=path.name):
        verify_index(built)
    assert main(["index", "verify", str(built)]) == 2
    assert str(path.relative_to(built)) in capsys.readouterr().err
    assert main(["search", str(built), "a red circle", "--verify"]) == 2
    assert path.name in capsys.readouterr().err and "Traceback" not in capsys.readouterr().err


def test_intact_index_verifies(built, capsys):
    assert main(["index", "verify", str(built)]) == 0
    assert "intact (7 images" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["vectors", "faiss", "meta", "manifest"])
def test_truncated_files_are_named(built, which, capsys):
    path = {"vectors": _first_vectors(built), "faiss": _faiss_file(built),
            "meta": _first_vectors(built).with_name("meta.json"), "manifest": built / "manifest.json"}[which]
    _truncate(path, path.stat().st_size // 2)
    assert main(["search", str(built), "a red circle"]) == 2
    err = capsys.readouterr().err
    assert path.name in err and "rebuild" in err and "Traceback" not in err


def test_truncated_faiss_of_an_old_manifest_without_hash_is_named(built):
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["faiss_sha256"] = ""  # as an index written before the hash was recorded
    (built / "manifest.json").write_text(json.dumps(manifest))
    _truncate(_faiss_file(built), 100)
    with pytest.raises(IndexCorruptError, match=r"final-.*\.faiss"):
        open_index(built)


def test_build_refuses_to_overwrite_without_the_flag(built, model, images, capsys):
    before = (built / "manifest.json").read_text()
    with pytest.raises(ValueError, match="already holds an index"):
        build_index([images / "img_00.png"], built, model, layers=LAYERS, progress=False)
    assert main(["index", "build", str(images / "img_00.png"), "--out", str(built), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("siglip-dola index build: error:") and "--overwrite" in err and "index add" in err
    assert (built / "manifest.json").read_text() == before
    manifest = build_index([images / "img_00.png"], built, model, layers=LAYERS, progress=False, overwrite=True)
    assert manifest.count == 1 == len(open_index(built))


def test_empty_index_is_refused(model, tmp_path, capsys):
    folder = write_images(tmp_path / "only_broken", 0, corrupt=["bad.png"])
    with pytest.raises(ValueError, match="no image could be indexed.*bad.png"):
        build_index([folder], tmp_path / "idx", model, layers=LAYERS, progress=False)
    assert not (tmp_path / "idx" / "manifest.json").exists()
    assert main(["index", "build", str(folder), "--out", str(tmp_path / "idx2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no image could be indexed" in err and "bad.png" in err
    assert not (tmp_path / "idx2" / "manifest.json").exists()


def test_moved_image_folder_is_found_with_image_root(model, tmp_path, capsys):
    folder = write_images(tmp_path / "photos" / "set", 4)
    build_index([folder], tmp_path / "idx", model, layers=LAYERS, progress=False)
    meta_paths = json.loads(next((tmp_path / "idx" / "segments").glob("*/meta.json")).read_text())["paths"]
    assert meta_paths == [f"img_{i:02d}.png" for i in range(4)]  # relative to the recorded root
    moved = tmp_path / "elsewhere" / "set2"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    with pytest.warns(UserWarning, match="image_root="):
        stale = open_index(tmp_path / "idx")
    assert not any(map(lambda p: (tmp_path / p).exists(), stale.paths))
    index = open_index(tmp_path / "idx", image_root=moved)
    assert index.paths == [str(moved / f"img_{i:02d}.png") for i in range(4)]
    assert all((moved / p).is_file() for p in index.paths)
    assert main(["search", str(tmp_path / "idx"), "a red circle", "--image-root", str(moved), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert {h["item"] for h in hits} == set(index.paths)
    # adding at the new place: the moved images are recognised as indexed, a new one is added
    write_images(moved / "more", 1, seed=3)
    manifest = add_to_index(tmp_path / "idx", [moved], model, progress=False, image_root=moved)
    assert manifest.count == 5 and manifest.image_root == str(moved)
    assert sorted(open_index(tmp_path / "idx").paths) == sorted([*index.paths, str(moved / "more" / "img_00.png")])


def test_same_weights_under_another_name_are_accepted(built, model, tiny_dir, tmp_path):
    copied = tmp_path / "copy_of_weights"
    shutil.copytree(tiny_dir, copied)  # other path, other mtimes, same weights
    from siglip_dola.loading import load

    same = load(copied, device="cpu")
    assert same.model_id != model.model_id
    assert len(open_index(built, same)) == 7
    assert search(built, "a red circle", same, top_k=2).results


def test_second_writer_fails_clearly(built, model, images):
    with storage.writer_lock(built):
        with pytest.raises(RuntimeError, match="being written by another siglip-dola process"):
            add_to_index(built, [images], model, progress=False)
        with pytest.raises(RuntimeError, match="being written"):
            build_index([images], built, model, layers=LAYERS, progress=False, overwrite=True)
    assert add_to_index(built, [images], model, progress=False).count == 7  # the lock died with its holder


@pytest.mark.parametrize("where", ["segment", "faiss"])
def test_full_disk_during_a_rebuild_loses_nothing(built, model, images, monkeypatch, capsys, where):
    before = (built / "manifest.json").read_text()
    paths_before = open_index(built).paths

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(built / "x.tmp"))
    if where == "segment":
        monkeypatch.setattr(storage.np, "save", disk_full)
    else:
        monkeypatch.setattr(faiss_store.faiss, "write_index", disk_full)
    code = main(["index", "build", str(images / "img_00.png"), str(images / "img_01.png"), "--out", str(built),
                 "--overwrite", "--quiet", "--chunk-size", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "disk is full" in err and "Traceback" not in err
    monkeypatch.undo()
    assert (built / "manifest.json").read_text() == before
    assert open_index(built, verify=True).paths == paths_before
    assert not list(built.rglob("*.tmp"))  # no partial file left behind


def test_cli_index_add_relocates_and_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    text = capsys.readouterr().out
    assert "exit status" in text and "--overwrite" in text and "skipped" in text


def test_one_progress_bar_and_reuse_is_reported(model, images, tmp_path, capsys):
    build_index([images], tmp_path / "idx", model, layers=LAYERS, chunk_size=2, progress=True, store_options=FP16)
    err = capsys.readouterr().err
    assert "indexing" in err and "8/8" in err and "embedding" not in err  # one bar over all 4 chunks
    assert "reusing" not in err
    build_index([images], tmp_path / "idx", model, layers=LAYERS, chunk_size=2, progress=True, overwrite=True,
                store_options=FP16)  # an fp16 store keeps the vectors a rebuild reuses
    err = capsys.readouterr().err
    assert "reusing 4 finished segment(s) (8 images)" in err
