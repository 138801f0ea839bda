"""Build, extend and open a persisted retrieval index (layout: see ``retrieval/storage.py``).

    build_index(images, out, model, layers=None, bucket=None)  -> Manifest   # embeds every image once
    add_to_index(index, images, model)                          -> Manifest   # skips already indexed paths
    open_index(index, model=None, layers=None)                  -> RetrievalIndex

Every image is embedded once (final + all stored layers in one readout call, via ``embed.embed_images``,
which shards over torchrun ranks). Work is done in chunks of ``chunk_size`` images; each chunk becomes a
staged segment, so an interrupted build resumes where it stopped. Nothing the previous manifest
references is touched before the new manifest is committed.
"""
from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siglip_dola import distributed
from siglip_dola.evaluation.embed import embed_images
from siglip_dola.data.images import expand_image_paths
from siglip_dola.layers import resolve_layers
from siglip_dola.retrieval import faiss_store, storage
from siglip_dola.retrieval.storage import Manifest

DEFAULT_CHUNK_SIZE = 4096


def _default_layers(num_layers: int, layers, bucket) -> list[int]:
    """Explicit layers, a bucket's even layers, or (neither) the last of 3 buckets ({18, 20, 22} for N=24)."""
    if layers is None and bucket is None:
        bucket = 3
    return resolve_layers(num_layers, layers=layers, bucket=bucket)


def _new_manifest(model, layers: list[int]) -> Manifest:
    readout = model.readout
    preprocessing = f"image_size={tuple(readout.image_size)}; {model.preprocess!r}".replace("\n", " ")
    preprocessing = re.sub(r" at 0x[0-9a-fA-F]+", "", preprocessing)  # a bare function's repr carries its address
    return Manifest(model_id=model.model_id, layers=list(layers), num_layers=int(readout.num_layers),
                    embed_dim=int(readout.embed_dim), logit_scale=float(model.logit_scale),
                    preprocessing=preprocessing[:2000])


def check_compatible(manifest: Manifest, model_id: str | None, layers=None, root="") -> None:
    """ValueError when the index was built with another model, or lacks requested layers."""
    if model_id is not None and model_id != manifest.model_id:
        raise ValueError(f"index {str(root)!r} was built with model {manifest.model_id!r}, not {model_id!r}; "
                         f"use --model {manifest.model_id} or rebuild the index with the new model")
    if layers is not None:
        missing = [j for j in layers if j not in manifest.layers]
        if missing:
            raise ValueError(f"index {str(root)!r} stores layers {manifest.layers}; layers {missing} were "
                             f"requested (valid: any of {manifest.layers}; rebuild with --layers to store others)")


def _vectors_from(embeddings) -> np.ndarray:
    """Embeddings(z_final [n, D], z_layers [J, n, D]) -> L2-normalised float32 [n, 1+J, D]."""
    stacked = torch.cat([embeddings.z_final.unsqueeze(0), embeddings.z_layers], dim=0)  # (1+J, n, D)
    stacked = torch.nn.functional.normalize(stacked.float(), dim=-1)
    return stacked.permute(1, 0, 2).contiguous().numpy()  # (n, 1+J, D)


def _find_done(root: Path, name: str) -> bool:
    """True if a complete segment `name` exists, committed or staged."""
    return any(storage.read_segment_meta(root / sub / name) is not None
               for sub in (storage.SEGMENTS, storage.STAGING))


def _embed_chunks(root: Path, model, paths: list[str], layers: list[int], batch_size: int,
                  chunk_size: int, progress: bool) -> list[str]:
    """Embed `paths` chunk by chunk into staged segments (skipping finished ones); returns segment names."""
    chunks = [paths[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    names = [storage.segment_key(model.model_id, layers, chunk) for chunk in chunks]
    done = [_find_done(root, name) for name in names]  # decided by every rank before anyone writes
    for chunk, name, finished in zip(chunks, names, done):
        if finished:
            continue
        embeddings = embed_images(model, chunk, layers, batch_size=batch_size, progress=progress)
        if embeddings is not None:  # rank 0 (the others get None and write nothing)
            storage.write_segment(root / storage.STAGING / name, _vectors_from(embeddings),
                                  embeddings.ids, embeddings.skipped)
    return names


def _segment_entries(root: Path, names: list[str]) -> list[tuple[dict, dict]]:
    """Promote staged segments; [(manifest entry, meta)] in order, empty segments dropped."""
    entries = []
    for name in names:
        if storage.read_segment_meta(root / storage.SEGMENTS / name) is None:
            storage.promote_segment(root, name)
        meta = storage.read_segment_meta(root / storage.SEGMENTS / name)
        assert meta is not None, f"segment {name} vanished before commit"
        entries.append(({"name": name, "count": meta["count"], "sha256": meta["sha256"]}, meta))
    return entries


def _merge_skipped(old: list, metas: list[dict], indexed: set[str]) -> list[list[str]]:
    """Skipped files (path, error), latest error per path, minus paths that are now indexed."""
    skipped = {path: error for path, error in old}
    for meta in metas:
        skipped.update({path: error for path, error in meta["skipped"]})
    return [[path, error] for path, error in skipped.items() if path not in indexed]


def commit_segments(root: Path, manifest: Manifest, names: list[str], base_faiss) -> Manifest:
    """Rank 0: promote segments, write the FAISS file, then the manifest (the commit point); clean up."""
    entries = _segment_entries(root, names)
    new_segments = [entry for entry, meta in entries if entry["count"]]
    metas = [meta for _, meta in entries]
    manifest.segments = manifest.segments + new_segments
    manifest.count = sum(seg["count"] for seg in manifest.segments)
    manifest.checksum = storage.index_checksum(manifest.segments)
    indexed = _indexed_paths(root, manifest)
    manifest.skipped = _merge_skipped(manifest.skipped, metas, indexed)
    manifest.faiss_file = faiss_store.write(root, manifest, base_faiss,
                                            [root / storage.SEGMENTS / seg["name"] for seg in new_segments])
    storage.write_manifest(root, manifest)
    storage.remove_unreferenced(root, manifest)
    return manifest


def _indexed_paths(root: Path, manifest: Manifest) -> set[str]:
    """Paths held by the manifest's segments."""
    paths: set[str] = set()
    for seg in manifest.segments:
        paths.update(storage.read_segment_meta(root / storage.SEGMENTS / seg["name"])["paths"])
    return paths


def _resolved(images) -> list[str]:
    """Absolute path strings of the image files named by `images` (files, folders, globs)."""
    return [str(p.resolve()) for p in expand_image_paths(images)]


def _ingest(root: Path, model, paths: list[str], manifest: Manifest, base_faiss, batch_size: int,
            chunk_size: int, progress: bool) -> Manifest:
    """Embed `paths` into segments and commit them on top of `manifest` (every rank returns the result)."""
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    names = _embed_chunks(root, model, paths, manifest.layers, batch_size, chunk_size, progress)
    committed = None
    if distributed.is_main_process():
        try:
            committed = commit_segments(root, manifest, names, base_faiss).to_json()
        except Exception as err:  # tell the other ranks instead of leaving them waiting
            distributed.broadcast_from_rank0(f"{type(err).__name__}: {err}")
            raise
    committed = distributed.broadcast_from_rank0(committed)
    if isinstance(committed, str):
        raise RuntimeError(f"index: rank 0 failed to commit the index: {committed}")
    return Manifest(**committed)


def build_index(images, out, model, layers=None, bucket=None, batch_size: int = 32,
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True) -> Manifest:
    """Embed every image once and write a new index at `out` (replacing an old one only at commit).

    images: files / folders / globs; model: a LoadedModel; layers or bucket: the candidate layers
    stored next to the final embedding (default: bucket 3 of 3, even layers).
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"out must be a folder (the index), got existing file {str(root)!r}")
    stored = _default_layers(model.readout.num_layers, layers, bucket)
    paths = _resolved(images)
    return _ingest(root, model, paths, _new_manifest(model, stored), None, batch_size, chunk_size, progress)


def add_to_index(index, images, model, batch_size: int = 32, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 progress: bool = True) -> Manifest:
    """Add the images not yet indexed to the index at `index`; same model and layers as the index."""
    root = Path(index)
    manifest = storage.read_manifest(root)
    check_compatible(manifest, model.model_id, root=root)
    indexed = _indexed_paths(root, manifest)
    paths = [p for p in _resolved(images) if p not in indexed]
    if not paths:
        return manifest
    base = faiss_store.read(root, manifest) if distributed.is_main_process() else None
    return _ingest(root, model, paths, manifest, base, batch_size, chunk_size, progress)


@dataclass
class RetrievalIndex:
    """An opened index: FAISS over final embeddings, memory-mapped layer vectors, paths by id."""
    root: Path
    manifest: Manifest
    faiss_index: object
    paths: list[str]
    offsets: np.ndarray            # [S + 1] first id of each segment, then the count
    segment_vectors: list          # per segment: memory-mapped [n_s, 1+J, D] float16

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def tau(self) -> float:
        """Temperature of the model the index was built with: 1 / exp(logit_scale)."""
        return float(np.exp(-self.manifest.logit_scale))

    def __len__(self) -> int:
        return self.manifest.count

    def vectors(self, ids: np.ndarray, rows: list[int]) -> np.ndarray:
        """Stored vectors of `ids` [K] at `rows` (0 = final, 1+j = layers[j]) -> float32 [len(rows), K, D]."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), len(rows), self.manifest.embed_dim), dtype=np.float32)  # (K, R, D)
        segment_of = np.searchsorted(self.offsets, ids, side="right") - 1  # (K,)
        for seg in np.unique(segment_of):
            where = np.nonzero(segment_of == seg)[0]
            local = ids[where] - self.offsets[seg]
            order = np.argsort(local)  # ascending reads from the memory map
            out[where[order]] = self.segment_vectors[seg][local[order]][:, rows]  # (k, R, D)
        return out.transpose(1, 0, 2)  # (R, K, D) view


def open_index(index, model=None, layers=None, verify: bool = False) -> RetrievalIndex:
    """Open the index at `index`; `model` (LoadedModel or model id) and `layers` are checked against it.

    verify=True re-hashes every segment (slow for large galleries) and raises ValueError on corruption.
    """
    root = Path(index)
    manifest = storage.read_manifest(root)
    model_id = model if isinstance(model, str) or model is None else model.model_id
    check_compatible(manifest, model_id, layers, root)
    folders = [root / storage.SEGMENTS / seg["name"] for seg in manifest.segments]
    paths = []
    for folder, seg in zip(folders, manifest.segments):
        if verify:
            storage.verify_segment(folder, seg["sha256"])
        paths.extend(storage.read_segment_meta(folder)["paths"])
    counts = [seg["count"] for seg in manifest.segments]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    vectors = [storage.open_vectors(folder) for folder in folders]
    return RetrievalIndex(root, manifest, faiss_store.read(root, manifest), paths, offsets, vectors)
