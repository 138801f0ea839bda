"""The first-stage FAISS index over the final-layer embeddings of an index's segments: read, write, search.

Which index is built is chosen in first_stage.py. The exact one (below ~1M images) is, on CPU,
``IndexScalarQuantizer(D, QT_fp16, METRIC_INNER_PRODUCT)``, an exact (brute-force) inner-product scan
over fp16 codes: 2 bytes per dimension (2 KB per image at D=1024, half of IndexFlatIP), no training. The stored vectors are L2-normalised, so inner product = cosine. Where GPU FAISS is installed
(``faiss.get_num_gpus() > 0``) the opened index is an fp16 ``GpuIndexFlatIP`` holding the same codes.
"""
from __future__ import annotations

import ctypes
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from siglip_dola.dependencies import require
from siglip_dola.io import atomic_path
from siglip_dola.retrieval import file_blocks, first_stage, storage

faiss = require("faiss", "retrieval", "image indexes and search")   # any build: faiss-cpu, faiss-gpu, conda's

SMALL_SCAN = 1 << 25  # vectors x dims below which one query is scanned on one thread (32k x 1024)


LISTS_STAGED = "lists.ivfdata"  # the merged inverted lists, in .staging/ until the commit moves them


def _on_disk_lists(index):
    """The OnDiskInvertedLists of an IVF `index`, else None."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def mergeable_on_disk(index) -> bool:
    """True for an IVF index whose lists FAISS can hold on disk (plain array lists; not fast-scan blocks)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists)


def empty_like(index):
    """A trained, empty index with `index`'s parameters (an IVF index's lists are dropped, never copied)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        empty = faiss.clone_index(index)
        empty.reset()
        return empty
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    index.ntotal = ivf.ntotal = 0
    return index


def merge_on_disk(empty_path: Path, parts: list, lists_path: Path):
    """The trained empty index at `empty_path` holding the inverted lists of every index in `parts` (in order,
    their ids kept), written to `lists_path` by FAISS's on-disk lists: the merged codes are never in RAM, as
    faiss.contrib.ondisk.merge_ondisk (whose FAISS 1.8 version cannot take the lists of an opened index)."""
    merged = faiss.read_index(str(empty_path))
    ivf = faiss.extract_index_ivf(merged)
    lists_path.unlink(missing_ok=True)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_path))
    sources = faiss.InvertedListsPtrVector()
    for part in parts:
        sources.push_back(faiss.extract_index_ivf(part).invlists)
    if hasattr(lists, "merge_from_multiple"):  # FAISS >= 1.9 renamed it (and added id shifting, unused here)
        ntotal = lists.merge_from_multiple(sources.data(), sources.size(), False, False)
    else:
        ntotal = lists.merge_from(sources.data(), sources.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    merged.ntotal = ivf.ntotal = ntotal
    return merged


def write(root: Path, manifest, index) -> tuple[str, str, dict]:
    """Write the first-stage `index` atomically as final-<checksum>.faiss, its on-disk inverted lists (if
    merged on disk) moved beside it as final-<checksum>.ivfdata; (FAISS file, lists file or "", block checksums)."""
    assert index.ntotal == manifest.count, f"FAISS holds {index.ntotal} vectors, manifest {manifest.count}"
    name, lists_name = f"final-{manifest.checksum[:16]}.faiss", ""
    lists = _on_disk_lists(index)
    if lists is not None and Path(lists.filename).name == LISTS_STAGED:
        staged, lists_name = Path(lists.filename), f"final-{manifest.checksum[:16]}.ivfdata"
        with open(staged, "rb+") as handle:
            os.fsync(handle.fileno())
        lists.filename = lists_name  # FAISS stores the name; opening takes it from the .faiss file's folder
        os.replace(staged, root / lists_name)
    with atomic_path(root / name) as tmp:
        faiss.write_index(index, str(tmp))
    return name, lists_name, file_blocks.record(root, [name] + ([lists_name] if lists_name else []))


@contextmanager
def _quiet_c_stdout():
    """FAISS printf()s a line to stdout when it opens on-disk lists: keep it out of our stdout (JSON results)."""
    try:
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        libc.fflush(None)
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # no fd 1, or no C library to flush: leave stdout as it is
        yield
        return
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _check(root: Path, manifest, verify: bool) -> None:
    """Block checksums (format >= 4): sizes, and every block of the file FAISS reads into RAM; with verify, the
    memory-mapped lists' blocks too. Older indexes: the whole file's sha256 (format 2-3)."""
    if manifest.faiss_blocks:
        file_blocks.check(root, manifest.faiss_blocks, manifest.faiss_file, every_block=True)
        if manifest.faiss_lists_file:
            file_blocks.check(root, manifest.faiss_blocks, manifest.faiss_lists_file, every_block=verify)
    elif manifest.faiss_sha256:
        storage.verify_file(root, manifest.faiss_file, manifest.faiss_sha256)


def read(root: Path, manifest, use_gpu: bool | None = None, mmap: bool = True, verify: bool = False):
    """The index named by `manifest`: an IVF index with its inverted lists memory-mapped (mmap=True, and always
    for lists merged on disk), else in RAM (on the GPUs when GPU FAISS is installed, the first stage is exact and
    use_gpu is not False).

    The file is checked against the manifest first (``_check``): FAISS itself reads flipped bytes without
    complaint and answers wrongly. The build's tuned search parameters (nprobe) are applied.
    """
    path = Path(root) / manifest.faiss_file
    if not manifest.faiss_file or not path.is_file():
        raise storage.IndexCorruptError(root, manifest.faiss_file or "final-*.faiss", "FAISS file missing")
    _check(root, manifest, verify)
    info = manifest.first_stage or {}
    exact = first_stage.is_exact(info.get("factory", first_stage.EXACT))
    try:
        if manifest.faiss_lists_file:
            with _quiet_c_stdout():
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        else:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap and not exact else 0)
    except RuntimeError as err:  # truncated: a raw C++ message
        raise storage.IndexCorruptError(root, manifest.faiss_file, str(err).strip().splitlines()[-1]) from None
    if index.ntotal != manifest.count or index.d != manifest.embed_dim:
        raise storage.IndexCorruptError(root, manifest.faiss_file, f"holds {index.ntotal} x {index.d} vectors, "
                                        f"the manifest says {manifest.count} x {manifest.embed_dim}")
    first_stage.apply_params(index, info.get("search_params", ""))
    if use_gpu is False or not exact or faiss.get_num_gpus() == 0:
        return index
    return _to_gpu(index)


def _to_gpu(index):
    """An fp16 GpuIndexFlatIP with the same vectors on all GPUs; the CPU index if that fails."""
    try:
        flat = faiss.IndexFlatIP(index.d)
        flat.add(index.reconstruct_n(0, index.ntotal))
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = True
        return faiss.index_cpu_to_all_gpus(flat, co=options)
    except (AttributeError, RuntimeError) as err:  # CPU-only build or GPU out of memory
        warnings.warn(f"GPU FAISS unavailable ({err}); searching on CPU", RuntimeWarning, stacklevel=2)
        return index


@contextmanager
def _threads_for(work: int):
    """One OpenMP thread for small scans: idle FAISS threads spinning against torch's cost more than the
    scan itself (measured 10-30x slower queries at 10k x 1024 on 2 shared cores). Restored after."""
    threads = faiss.omp_get_max_threads()
    if work >= SMALL_SCAN or threads == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def search(index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner products [k], ids [k] int64) of the k best vectors for one query [D] (k <= ntotal).

    Equal scores are ordered by id (the earlier indexed image first), whatever order FAISS returned.
    """
    query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    with _threads_for(index.ntotal * index.d):
        scores, ids = index.search(query, k)
    scores, ids = scores[0], ids[0].astype(np.int64)
    order = np.lexsort((ids, -scores))
    return scores[order], ids[order]
