"""Committing staged segments: train on a sample (rank 0), encode + add per rank, merge, tune, write the manifest.

Every rank calls ``commit`` with all segment names (in id order) and the ones it wrote (a contiguous run):

1. rank 0 reads a sample of the staged fp16 vectors and trains what the index needs and lacks: the PQ
   codec of a pq layer store, and the first stage (FAISS ``index_factory`` string: ``--index-factory``, else
   ``first_stage.choose_factory`` from the gallery size and ``--index-memory``); both go to .staging/;
2. each rank encodes its own segments into the layer store (+ row checksums; a codec-free store's segments
   were encoded when written, and staged only their final rows) and adds their final rows to a copy of
   the trained, empty first stage: .staging/part-<rank>.faiss (IVF: under their global ids);
3. rank 0 merges the parts in rank order (IVF lists on disk, faiss_store.merge_on_disk; others with
   ``merge_from``), tunes nprobe on held-out gallery vectors against an exact chunked scan, writes the
   FAISS file(s), then the manifest.

No rank holds more than its own segments' codes, and rank 0 its training sample and held-out queries. The
staged fp16 vectors of a compressed store are deleted once the manifest is committed.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from siglip_dola import distributed
from siglip_dola.dependencies import require
from siglip_dola.io import atomic_path
from siglip_dola.retrieval import faiss_store, first_stage, layer_store, segment, storage
from siglip_dola.retrieval.segment import store_of
from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval.storage import Manifest

faiss = require("faiss", "retrieval", "image indexes and search")

SEED = 0


def check_options(options: StoreOptions, dim: int) -> None:
    """ValueError naming the bad option."""
    layer_store.parse_store(options.layer_store, dim)
    first_stage.parse_memory(options.index_memory)
    if not 0 < float(options.target_recall) <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {options.target_recall!r}")
    if isinstance(options.rerank_k, bool) or not isinstance(options.rerank_k, int) or options.rerank_k < 1:
        raise ValueError(f"rerank_k must be a positive int, got {options.rerank_k!r}")


def locate(root: Path, name: str) -> Path:
    """The folder of segment `name`: staged (this run's), else committed (reused, or promoted by an
    interrupted commit)."""
    staged = root / storage.STAGING / name
    return staged if segment.read_segment_meta(staged) is not None else root / storage.SEGMENTS / name


def _sample_rows(root: Path, names: list[str], counts: list[int], ids: np.ndarray, rows) -> np.ndarray:
    """Staged vectors of global image `ids` (sorted) at `rows` -> float32 [len(ids), len(rows), D]."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for number, name in enumerate(names):
        local = ids[(ids >= offsets[number]) & (ids < offsets[number + 1])] - offsets[number]
        if len(local):
            parts.append(np.asarray(segment.staged_vectors(locate(root, name))[local[:, None], rows], dtype=np.float32))
    return np.concatenate(parts)


def _prepare(root: Path, manifest: Manifest, names: list[str], counts: list[int], options: StoreOptions,
             adding: bool) -> dict:
    """Rank 0: train what is missing; returns {codec, empty: staged file paths, factory, trained_on, held_out}."""
    staging = root / storage.STAGING
    staging.mkdir(parents=True, exist_ok=True)
    total, rng = sum(counts), np.random.default_rng(SEED)
    store = store_of(root, manifest) if adding else layer_store.LayerStore(
        layer_store.parse_store(options.layer_store, manifest.embed_dim), 1 + len(manifest.layers), manifest.embed_dim)
    if store.needs_training and store.codec is None:
        images = np.sort(rng.choice(total, min(total, layer_store.TRAIN_SAMPLE // store.rows), replace=False))
        store.train(_sample_rows(root, names, counts, images, list(range(store.rows))).reshape(-1, store.dim))
    (staging / "layers.faiss").write_bytes(layer_store.codec_bytes(store))
    plan = {"store": store.name, "held_out": []}
    if adding:
        empty = faiss_store.empty_like(faiss_store.read(root, manifest, use_gpu=False, mmap=True))
        plan.update(factory=(manifest.first_stage or {}).get("factory", first_stage.EXACT))
    else:
        factory = options.index_factory or first_stage.choose_factory(
            total, manifest.embed_dim, first_stage.parse_memory(options.index_memory))
        order = rng.permutation(total)
        held = 0 if first_stage.is_exact(factory) else min(first_stage.TUNE_QUERIES, max(1, total // 5))
        n_train = min(first_stage.train_size(factory, total), total - held) if held else 0
        train_ids = np.sort(order[:n_train])
        sample = _sample_rows(root, names, counts, train_ids, [0])[:, 0] if n_train else None
        empty = first_stage.train(factory, manifest.embed_dim, sample)
        held_out = order[n_train:n_train + held]
        plan.update(factory=factory, trained_on=int(n_train), held_out=[int(i) for i in np.sort(held_out)])
    faiss.write_index(empty, str(staging / "empty.faiss"))
    return plan


def _encode_and_add(root: Path, manifest: Manifest, owned: list[str], rank: int, first_id: int) -> None:
    """Every rank: encode its segments into the store and write its first-stage part (an IVF part's vectors under
    their global ids, from `first_id`, so that rank 0 merges the lists without shifting ids)."""
    staging = root / storage.STAGING
    store = layer_store.LayerStore(manifest.layer_store, 1 + len(manifest.layers), manifest.embed_dim)
    if store.needs_training:
        layer_store.load_codec(store, (staging / "layers.faiss").read_bytes())
    part = faiss.read_index(str(staging / "empty.faiss"))
    ivf = faiss.try_extract_index_ivf(part) is not None
    for name in owned:
        folder = locate(root, name)
        meta = segment.encode_segment(folder, store)
        if meta["count"]:
            final = segment.staged_vectors(folder)[:, 0]
            for start in range(0, len(final), 65536):
                rows = np.ascontiguousarray(final[start:start + 65536], dtype=np.float32)
                if ivf:
                    part.add_with_ids(rows, np.arange(first_id, first_id + len(rows), dtype=np.int64))
                else:
                    part.add(rows)
                first_id += len(rows)
    with atomic_path(staging / f"part-{rank}.faiss") as tmp:
        faiss.write_index(part, str(tmp))


def _merge(root: Path, manifest: Manifest, world: int, adding: bool):
    """Rank 0: the parts in rank order. IVF lists are merged on disk (only the index being added to and the parts
    are memory-mapped: no rank holds the gallery's codes); other first stages (and IVF fast-scan lists, which FAISS
    cannot keep on disk) in RAM: the exact one is chosen below ~1M images, so its fp16 codes are bounded (2 GB at
    D=1024)."""
    staging = root / storage.STAGING
    base = faiss_store.read(root, manifest, use_gpu=False, mmap=True) if adding else None
    empty = faiss.read_index(str(staging / "empty.faiss"))
    if faiss_store.mergeable_on_disk(empty):
        parts = ([base] if base is not None else []) + [
            faiss.read_index(str(staging / f"part-{rank}.faiss"), faiss.IO_FLAG_MMAP) for rank in range(world)]
        return faiss_store.merge_on_disk(staging / "empty.faiss", parts, staging / faiss_store.LISTS_STAGED)
    merged = base
    for rank in range(world):
        part = faiss.read_index(str(staging / f"part-{rank}.faiss"))
        if merged is None:
            merged = part
        elif part.ntotal:
            merged.merge_from(part, 0)  # an IVF part's ids are global already; other indexes number in order
    return merged


def _tune(root: Path, index, names, counts, plan: dict, options: StoreOptions) -> dict:
    """Search params for the recall target, measured against an exact scan of the staged final rows."""
    info = {"factory": plan["factory"], "search_params": "", "k": options.rerank_k,
            "target_recall": options.target_recall, "trained_on": plan.get("trained_on", 0), "recall": 1.0,
            "tune_queries": len(plan["held_out"]), "refine": 1}
    if not plan["held_out"]:
        return info
    held = np.asarray(plan["held_out"])
    queries = _sample_rows(root, names, counts, held, [0])[:, 0]
    k = min(options.rerank_k, index.ntotal)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    chunks = ((offsets[i] + s, np.asarray(segment.staged_vectors(locate(root, n))[s:s + 65536, 0], dtype=np.float32))
              for i, n in enumerate(names) for s in range(0, counts[i], 65536))
    exact = first_stage.exact_top_k(queries, chunks, k)

    def rescore(ids: np.ndarray) -> np.ndarray:  # the final rows' cosines, as a search reads them from the store
        out = np.empty(ids.shape, dtype=np.float32)
        for first in range(0, len(ids), 16):  # 16 queries' rows at a time: 200 x 3,200 rows would be 2.6 GB
            batch = ids[first:first + 16]
            unique = np.unique(batch[batch >= 0])
            rows = _sample_rows(root, names, counts, unique, [0])[:, 0]  # (u, D), only the final rows read
            where = np.searchsorted(unique, np.maximum(batch, 0))  # (q, k')
            out[first:first + 16] = [rows[w] @ q for w, q in zip(where, queries[first:first + 16])]
        return out
    info["search_params"], info["recall"], info["refine"] = first_stage.tune(
        index, queries, exact, k, options.target_recall, rescore)
    return info


def all_ok(error: str | None) -> None:
    """Raise on every rank if any rank failed (errors gathered to rank 0, then broadcast)."""
    errors = distributed.gather_to_rank0(error)
    message = "; ".join(e for e in errors if e) if errors is not None else None
    message = distributed.broadcast_from_rank0(message)
    if message:
        raise RuntimeError(f"index: {message}")


def guarded(work):
    try:
        work()
        return None
    except Exception as err:  # reported to every rank by _all_ok
        if distributed.rank_and_world()[1] == 1:
            raise
        return f"rank {distributed.rank_and_world()[0]}: {type(err).__name__}: {err}"


def commit(root: Path, manifest: Manifest, names: list[str], owned: list[str], options: StoreOptions,
           finish) -> Manifest:
    """Every rank: train (rank 0), encode + add (each its `owned`), merge + tune + commit (rank 0 via `finish`)."""
    rank, world = distributed.rank_and_world()
    adding = bool(manifest.count)
    plan = {}
    metas = [segment.read_segment_meta(locate(root, name)) for name in names] if rank == 0 else []
    counts = [meta["count"] for meta in metas]

    def prepare():
        if sum(counts) == 0 and not adding:
            finish(manifest, [], metas, None, {})  # raises: nothing could be indexed
        plan.update(_prepare(root, manifest, names, counts, options, adding))
        manifest.layer_store = plan["store"]
    all_ok(guarded(prepare) if rank == 0 else None)
    manifest.layer_store, counts = distributed.broadcast_from_rank0((manifest.layer_store, counts))
    first_id = manifest.count + sum(counts[:names.index(owned[0])]) if owned else 0
    all_ok(guarded(lambda: _encode_and_add(root, manifest, owned, rank, first_id)))
    result = {}

    def merge_and_commit():
        index = _merge(root, manifest, world, adding)
        info = manifest.first_stage if adding else _tune(root, index, names, counts, plan, options)
        if adding and info and info.get("trained_on") and info["trained_on"] < 0.01 * index.ntotal:
            warnings.warn(f"index {str(root)!r}: the first stage's coarse quantiser was trained on {info['trained_on']} "
                          f"vectors, under 1% of the {index.ntotal} it now holds; recall may have dropped: rebuild "
                          "(`siglip-dola index build ... --overwrite`) to retrain", RuntimeWarning, stacklevel=4)
        codec = (root / storage.STAGING / "layers.faiss").read_bytes()
        result["manifest"] = finish(manifest, names, metas, index, {"first_stage": info, "codec": codec})
    all_ok(guarded(merge_and_commit) if rank == 0 else None)
    return distributed.broadcast_from_rank0(result.get("manifest"))
