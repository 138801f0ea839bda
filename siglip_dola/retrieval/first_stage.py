"""Choosing, training and tuning the first stage (the FAISS index over final embeddings), autofaiss-style.

    choose_factory(n, dim, memory_bytes)  -> a FAISS index_factory string
    train(factory, dim, sample)           -> an empty trained index
    tune(index, queries, exact_ids, k, target_recall) -> (search params, measured recall)

Below ``FLAT_BELOW`` images, when their fp16 codes fit the budget, the first stage is the exact fp16
scan ("SQfp16"). Above, IVF with PQ codes: nlist ~ sqrt(n)
(a power of two), an HNSW coarse quantiser from 2^16 lists (as autofaiss), PQ with the largest code of
at most 128 bytes whose lists fit the memory budget, and OPQ rotation below 64 bytes (where it pays).
A search fetches refine x K candidates and keeps the K best by the layer store's final rows; nprobe and
the refine factor are tuned together at build time (``tune``).
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np

from siglip_dola.dependencies import require

faiss = require("faiss", "retrieval", "image indexes and search")

EXACT = "SQfp16"
FLAT_BELOW = 1_000_000
MAX_CODE = 128
TRAIN_PER_LIST = 32      # training vectors per inverted list (FAISS warns below 39; k-means cost is linear)
TRAIN_MAX = 262_144
TUNE_QUERIES = 200
PQ_ITERATIONS = 10


def parse_memory(text) -> int:
    """'4G', '512M', '2.5GB', 4000000 -> bytes; ValueError naming index_memory."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"index_memory must be a size like 4G, 512M or 16GB, got {text!r}")
    unit = match.group(2).upper()
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(unit) + 1 if unit else 0))


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest sqrt(n), between 16 and 2^18.

    FAISS's guidance is 4-16 sqrt(n); sqrt(n) keeps k-means (linear in nlist) affordable on a few cores,
    and the tuned nprobe makes up the recall."""
    return int(min(1 << 18, max(16, 1 << round(math.log2(math.sqrt(max(n, 1)))))))


def choose_factory(n: int, dim: int, memory_bytes: int) -> str:
    """An index_factory string for n vectors of `dim` under a RAM budget of `memory_bytes`."""
    if n < FLAT_BELOW and n * dim * 2 <= memory_bytes:
        return EXACT
    nlist = nlist_for(n)
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 1 << 16 else f"IVF{nlist}"
    centroid_bytes = nlist * dim * 4 * (1.5 if nlist >= 1 << 16 else 1)
    fitting = [m for m in (128, 64, 32, 16, 8) if dim % m == 0 and n * (m + 8) + centroid_bytes <= memory_bytes]
    if not fitting:
        raise ValueError(f"index_memory {memory_bytes / 2**30:.2f} GiB cannot hold {n} vectors even as 8-byte "
                         f"PQ codes (+ 8-byte ids): give more, e.g. {math.ceil((n * 16 + centroid_bytes) / 2**30)}G")
    m = fitting[0]
    return f"OPQ{m}_{min(m * 4, dim)},{quantizer},PQ{m}" if m < 64 else f"{quantizer},PQ{m}"


def is_exact(factory: str) -> bool:
    return factory in (EXACT, "Flat")


def train_size(factory: str, n: int) -> int:
    """Vectors to train `factory` on: TRAIN_PER_LIST per list, at least 2^14 (PQ's 256 centroids), <= n."""
    match = re.search(r"IVF(\d+)", factory)
    lists = int(match.group(1)) if match else 0
    return int(min(n, TRAIN_MAX, max(1 << 14, lists * TRAIN_PER_LIST)))


def new_index(factory: str, dim: int):
    """An empty index for `factory` with inner product (ValueError naming index_factory when FAISS refuses)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"index_factory {factory!r} is not a FAISS factory string for D={dim}: "
                         f"{str(err).strip().splitlines()[-1]}") from None
    no_polysemous_training(index)
    fewer_pq_iterations(index)
    return index


def fewer_pq_iterations(index) -> None:
    """PQ training at FAISS's 10 k-means iterations (the coarse quantiser's own count) instead of 25: the
    codes only pick candidates that the stored final rows refine, and PQ128 training was a third of a build."""
    ivf = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None:
        pq.cp.niter = min(pq.cp.niter, PQ_ITERATIONS)


def no_polysemous_training(index) -> None:
    """index_factory turns on polysemous training for PQ codes (unless "np"): an annealing that only serves
    polysemous (Hamming-filtered) search, which is never used here, and took minutes on 2,400 vectors."""
    for part in (faiss.try_extract_index_ivf(index), faiss.downcast_index(index)):
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def train(factory: str, dim: int, sample: np.ndarray):
    """A trained, empty index for `factory` (sample [m, D] float32)."""
    index = new_index(factory, dim)
    if not index.is_trained:
        try:
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as err:  # e.g. fewer training vectors than lists or centroids
            raise ValueError(f"index_factory {factory!r} cannot be trained on {len(sample)} vectors: "
                             f"{str(err).strip().splitlines()[-1]} (a smaller IVF / PQ, or the exact SQfp16)") from None
    return index


def exact_top_k(queries: np.ndarray, chunks, k: int) -> np.ndarray:
    """Exact inner-product top-k ids [q, k] over `chunks` (iterable of (first id, vectors [c, D])), merged by
    FAISS's ResultHeap: the gallery is never held at once."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for first, vectors in chunks:
        scores, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                                np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(vectors)),
                                metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(ids >= 0, ids + first, -1))
    heap.finalize()
    return heap.I


def overlap(ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean |ids[:, :k] & exact_ids[:, :k]| / k over the queries (-1 ids never match)."""
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[:, :k].tolist(), exact_ids[:, :k].tolist())]))


def refined(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The k best of the fetched `ids` [q, k'] by their stored-row `scores` [q, k'] (fetch order breaks ties)."""
    scores = np.where(ids >= 0, scores, -np.inf)
    return np.take_along_axis(ids, np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)


def recall(index, queries: np.ndarray, exact_ids: np.ndarray, k: int, factor: int = 1, rescore=None) -> float:
    """Mean |approx top-k & exact top-k| / k; with factor > 1 the first stage fetches k * factor and
    `rescore(ids [q, k*factor]) -> cosines` (the stored final rows) keeps the best k, as search does."""
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k * factor, index.ntotal))
    if factor > 1:
        ids = refined(ids, rescore(ids), k)
    return overlap(ids, exact_ids, k)


def search_params(index, nprobe: int) -> str:
    """The ParameterSpace string for `nprobe` (and the HNSW quantiser's efSearch when there is one)."""
    ivf = faiss.try_extract_index_ivf(index)
    params = f"nprobe={nprobe}"
    if ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        params += f",quantizer_efSearch={max(2 * nprobe, 64)}"
    return params


def apply_params(index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


REFINE_FACTORS = (1, 2, 4, 8, 16, 32)  # 32: what a gallery whose neighbours spread over every list needs


def tune(index, queries: np.ndarray, exact_ids: np.ndarray, k: int, target_recall: float,
         rescore=None) -> tuple[str, float, int]:
    """(search params, recall, refine factor): the smallest nprobe (powers of two) at which some refine factor
    (fetch k * factor candidates, keep the k best by the stored final rows, `rescore`) reaches `target_recall`,
    with the smallest such factor; else the best recall seen.

    One search per nprobe fetches k x the largest factor: a smaller factor's candidates are a prefix of
    that list (same code distances), so every factor is scored from it, and the stored rows are read once."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return "", recall(index, queries, exact_ids, k), 1
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    factors = [f for f in REFINE_FACTORS if k * f <= index.ntotal] if rescore is not None else [1]
    factors = factors or [1]
    best, nprobe = ("", -1.0, 1), 1
    while True:
        params = search_params(index, nprobe)
        apply_params(index, params)
        _, ids = index.search(queries, k * factors[-1])
        scores = rescore(ids) if factors[-1] > 1 else None
        for factor in factors:
            fetched = ids[:, :k * factor]
            measured = overlap(refined(fetched, scores[:, :k * factor], k) if factor > 1 else fetched, exact_ids, k)
            if measured > best[1]:
                best = (params, measured, factor)
            if measured >= target_recall:
                best = (params, measured, factor)
                break
        if best[1] >= target_recall or nprobe >= ivf.nlist:
            break
        nprobe = min(2 * nprobe, ivf.nlist)
    apply_params(index, best[0])
    if best[1] < target_recall:
        warnings.warn(f"first stage: recall@{k} {best[1]:.3f} < target {target_recall} even scanning every list "
                      f"and refining {factors[-1]}x (the codes are too coarse: a larger PQ code, or "
                      "index_factory= with SQ8)", RuntimeWarning, stacklevel=2)
    return best
