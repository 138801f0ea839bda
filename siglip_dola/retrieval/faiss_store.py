"""The first-stage FAISS index over the final-layer embeddings of an index's segments: read, write, search.

Which index is built is chosen in first_stage.py. The exact one (below ~1M images) is, on CPU,
``IndexScalarQuantizer(D, QT_fp16, METRIC_INNER_PRODUCT)``, an exact (brute-force) inner-product scan
over fp16 codes: 2 bytes per dimension (2 KB per image at D=1024, half of IndexFlatIP), no training. The stored vectors are L2-normalised, so inner product = cosine. Where GPU FAISS is installed
(``faiss.get_num_gpus() > 0``) the opened index is an fp16 ``GpuIndexFlatIP`` holding the same codes.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from siglip_dola.dependencies import require
from siglip_dola.io import atomic_path
from siglip_dola.retrieval import first_stage, storage

faiss = require("faiss", "retrieval", "image indexes and search")   # any build: faiss-cpu, faiss-gpu, conda's

SMALL_SCAN = 1 << 25  # vectors x dims below which one query is scanned on one thread (32k x 1024)


def write(root: Path, manifest, index) -> tuple[str, str]:
    """Write the first-stage `index` atomically as final-<checksum>.faiss; (file name, sha256)."""
    assert index.ntotal == manifest.count, f"FAISS holds {index.ntotal} vectors, manifest {manifest.count}"
    name = f"final-{manifest.checksum[:16]}.faiss"
    with atomic_path(root / name) as tmp:
        faiss.write_index(index, str(tmp))
        sha256 = storage.file_sha256(tmp)
    return name, sha256


def read(root: Path, manifest, use_gpu: bool | None = None, mmap: bool = True):
    """The index named by `manifest`: an IVF index with its inverted lists memory-mapped (mmap=True), else in
    RAM (on the GPUs when GPU FAISS is installed, the first stage is exact and use_gpu is not False).

    The file's sha256 is checked against the manifest first (format >= 2): FAISS itself reads flipped
    bytes without complaint and answers wrongly. The build's tuned search parameters (nprobe) are applied.
    """
    path = Path(root) / manifest.faiss_file
    if not manifest.faiss_file or not path.is_file():
        raise storage.IndexCorruptError(root, manifest.faiss_file or "final-*.faiss", "FAISS file missing")
    if manifest.faiss_sha256:
        storage.verify_file(root, manifest.faiss_file, manifest.faiss_sha256)
    info = manifest.first_stage or {}
    exact = first_stage.is_exact(info.get("factory", first_stage.EXACT))
    try:
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
