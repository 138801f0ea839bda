"""An IVF first stage's inverted lists merged on disk (no process holds the gallery's codes), and the FAISS files'
block checksums: what an open reads is checked at open, the memory-mapped lists by `index verify`."""
import json
import shutil

import faiss
import numpy as np
import pytest
from faiss.contrib.inspect_tools import get_invlist

from siglip_dola.cli import main
from siglip_dola.retrieval import IndexCorruptError, open_index, verify_index
from siglip_dola.retrieval import faiss_store
from test_retrieval_scale import build, gallery

FACTORY = "IVF16,PQ8"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ondisk") / "idx"
    build(root, gallery(1200), index_factory=FACTORY, layer_store="fp16", rerank_k=20)
    return root


@pytest.fixture
def copy(built, tmp_path):
    shutil.copytree(built, tmp_path / "idx")
    return tmp_path / "idx"


def _lists(index):
    ivf = faiss.extract_index_ivf(index)
    return [get_invlist(ivf.invlists, number) for number in range(ivf.nlist)]  # [(ids, codes)]


def _in_ram_reference(index, finals):
    """FAISS's own in-RAM IVF: the same trained quantiser and codebooks, every vector added in id order."""
    reference = faiss_store.empty_like(index)
    reference.add(np.ascontiguousarray(finals, dtype=np.float32))
    return reference


def test_ivf_lists_are_on_disk_beside_the_index(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["faiss_lists_file"].endswith(".ivfdata") and (built / manifest["faiss_lists_file"]).is_file()
    assert not (built / ".staging").exists()
    index = open_index(built)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.faiss_index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.filename == str(built / manifest["faiss_lists_file"])
    finals = index.vectors(np.arange(len(index)), [0])[0]  # the stored fp16 final rows the build added
    reference = _in_ram_reference(faiss_store.read(built, index.manifest, use_gpu=False), finals)
    for (ids, codes), (ref_ids, ref_codes) in zip(_lists(index.faiss_index), _lists(reference), strict=True):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(codes, ref_codes)


def test_merge_of_rank_parts_equals_adding_everything_in_one_index(tmp_path):
    """What rank 0 does for a world of 3: parts holding global ids, merged into on-disk lists in rank order."""
    vectors = gallery(900, seed=3)[:, 0].astype(np.float32)
    empty = faiss.index_factory(vectors.shape[1], "OPQ4_24,IVF8,PQ4", faiss.METRIC_INNER_PRODUCT)
    empty.train(vectors)
    faiss.write_index(empty, str(tmp_path / "empty.faiss"))
    parts = []
    for rank, (start, stop) in enumerate([(0, 300), (300, 650), (650, 900)]):
        part = faiss.read_index(str(tmp_path / "empty.faiss"))
        part.add_with_ids(vectors[start:stop], np.arange(start, stop))
        faiss.write_index(part, str(tmp_path / f"part-{rank}.faiss"))
        parts.append(faiss.read_index(str(tmp_path / f"part-{rank}.faiss"), faiss.IO_FLAG_MMAP))
    merged = faiss_store.merge_on_disk(tmp_path / "empty.faiss", parts, tmp_path / "lists.ivfdata")
    reference = faiss.read_index(str(tmp_path / "empty.faiss"))
    reference.add(vectors)
    assert merged.ntotal == faiss.extract_index_ivf(merged).ntotal == 900
    for (ids, codes), (ref_ids, ref_codes) in zip(_lists(merged), _lists(reference), strict=True):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(codes, ref_codes)
    faiss.extract_index_ivf(merged).nprobe = faiss.extract_index_ivf(reference).nprobe = 8
    np.testing.assert_array_equal(merged.search(vectors[:50], 5)[1], reference.search(vectors[:50], 5)[1])


def test_a_moved_index_opens_and_its_stdout_stays_clean(built, tmp_path, capfd):
    moved = tmp_path / "elsewhere"
    shutil.copytree(built, moved)
    capfd.readouterr()
    index = open_index(moved)
    assert faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.faiss_index).invlists).filename.startswith(
        str(moved))
    out = capfd.readouterr().out
    assert "IO_FLAG_ONDISK_SAME_DIR" not in out and out == ""  # FAISS's printf is kept off stdout


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flip_in_the_faiss_file_is_caught_at_open(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    path = copy / manifest["faiss_file"]
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(IndexCorruptError, match=path.name):
        open_index(copy)


def test_a_flip_in_the_lists_is_caught_by_verify(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    path = copy / manifest["faiss_lists_file"]
    _flip(path, 100)
    assert len(open_index(copy)) == 1200  # the cheap check at open: sizes, and the bytes read into RAM
    with pytest.raises(IndexCorruptError, match=path.name):
        verify_index(copy)
    assert main(["index", "verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert path.name in err and "xxh3_64" in err and "Traceback" not in err


def test_truncated_lists_are_caught_at_open(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    path = copy / manifest["faiss_lists_file"]
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 8)
    with pytest.raises(IndexCorruptError, match=path.name):
        open_index(copy)
