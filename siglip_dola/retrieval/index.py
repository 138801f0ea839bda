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
from siglip_dola.retrieval import faiss_store, storage
from siglip_dola.retrieval.storage import Manifest
from siglip_dola.settings import DoLaSettings, resolve_settings, settings_for_model

DEFAULT_CHUNK_SIZE = 4096
RETRIEVAL = "zeroshot_retrieval"


def stored_settings(manifest: Manifest) -> DoLaSettings:
    """The settings an index was built with (an index from before settings were stored: dynamic over its layers)."""
    if manifest.settings:
        return DoLaSettings.from_json(manifest.settings)
    return DoLaSettings(mode="dynamic", layers=list(manifest.layers), static_layer=None, alpha=0.1,
                        contrast_weight=1.0, bucket=None, n_buckets=None,
                        sources=dict.fromkeys(("mode", "layers", "alpha", "contrast_weight"), "default"))


def index_settings(manifest: Manifest, calibration=None, root="", warn: bool = True, **flags) -> DoLaSettings:
    """Search-time settings: flags > `calibration` > the index's stored settings > defaults; ValueError naming
    the layers the index lacks."""
    inherited = stored_settings(manifest) if calibration is None else None
    settings = resolve_settings(manifest.num_layers, calibration=calibration, model_id=manifest.model_id,
                                task=RETRIEVAL, inherited=inherited, warn=warn, **flags)
    missing = [j for j in settings.layers if j not in manifest.layers]
    if missing:
        origin = settings.sources["layers"] + (f" {settings.calibration!r}" if settings.calibration else "")
        raise ValueError(f"index {str(root)!r} stores layers {manifest.layers}, but the settings need layers "
                         f"{missing} (layers from: {origin}); pass --layers / --static-layer from "
                         f"{manifest.layers}, or rebuild the index with these settings (siglip-dola index build "
                         f"... with the same --calibration / --layers)")
    return settings


def _new_manifest(model, settings: DoLaSettings) -> Manifest:
    readout = model.readout
    preprocessing = f"image_size={tuple(readout.image_size)}; {model.preprocess!r}".replace("\n", " ")
    preprocessing = re.sub(r" at 0x[0-9a-fA-F]+", "", preprocessing)  # a bare function's repr carries its address
    return Manifest(model_id=model.model_id, layers=list(settings.layers), num_layers=int(readout.num_layers),
                    embed_dim=int(readout.embed_dim), logit_scale=float(model.logit_scale),
                    preprocessing=preprocessing[:2000], settings=settings.to_json())


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
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True, *, calibration=None, mode=None,
                alpha=None, contrast_weight=None, static_layer=None, n_buckets=None) -> Manifest:
    """Embed every image once and write a new index at `out` (replacing an old one only at commit).

    images: files / folders / globs; model: a LoadedModel. The DoLa settings (siglip_dola.settings: these
    flags > `calibration` > the model's own, e.g. the embedded model's shipped retrieval calibration >
    defaults) are stored in the manifest with the layers they read next to the final embedding.
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"out must be a folder (the index), got existing file {str(root)!r}")
    settings = settings_for_model(model, calibration, task=RETRIEVAL, mode=mode, layers=layers, bucket=bucket,
                                  n_buckets=n_buckets, static_layer=static_layer, alpha=alpha,
                                  contrast_weight=contrast_weight)
    paths = _resolved(images)
    return _ingest(root, model, paths, _new_manifest(model, settings), None, batch_size, chunk_size, progress)


def add_to_index(index, images, model, batch_size: int = 32, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 progress: bool = True, calibration=None) -> Manifest:
    """Add the images not yet indexed to the index at `index`; same model and layers as the index.

    `calibration` (optional) is checked against the stored layers, so a later search with it works."""
    root = Path(index)
    manifest = storage.read_manifest(root)
    check_compatible(manifest, model.model_id, root=root)
    if calibration is not None:
        index_settings(manifest, calibration, root=root)
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
