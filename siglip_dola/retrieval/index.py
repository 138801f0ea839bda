"""Build, extend and open a persisted retrieval index (layout: see ``retrieval/storage.py``).

    build_index(images, out, model, layers=None, bucket=None, overwrite=False) -> Manifest  # embeds once
    add_to_index(index, images, model, image_root=None)         -> Manifest   # skips already indexed paths
    open_index(index, model=None, layers=None, image_root=None, verify=False) -> RetrievalIndex
    verify_index(index)                                         -> Manifest   # full check (re-hash all)

Every image is embedded once (final + all stored layers in one readout call, via ``embed.embed_images``,
which shards over torchrun ranks). Work is done in chunks of ``chunk_size`` images; each chunk becomes a
staged segment, so an interrupted build resumes where it stopped. Nothing the previous manifest
references is touched before the new manifest is committed.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from siglip_dola import distributed
from siglip_dola.data.gpu_decode import check_decode
from siglip_dola.data.images import expand_image_paths
from siglip_dola.embedding.images import embed_images
from siglip_dola.retrieval import faiss_store, layer_store, segment, storage
from siglip_dola.retrieval.commit import all_ok, check_options, commit, guarded
from siglip_dola.retrieval.layer_store import LayerStore
from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval.opened import absolute_paths, check_compatible, check_relocatable, weights_fingerprint
from siglip_dola.retrieval.storage import Manifest
from siglip_dola.settings import DoLaSettings, resolve_settings, settings_for_model
from siglip_dola.tasks import RETRIEVAL
from siglip_dola.modes import DEFAULT

DEFAULT_CHUNK_SIZE = 4096


def stored_settings(manifest: Manifest) -> DoLaSettings:
    """The settings an index was built with (an index from before settings were stored: dynamic over its layers)."""
    if manifest.settings:
        return DoLaSettings.from_json(manifest.settings)
    return DoLaSettings(mode=DEFAULT, layers=list(manifest.layers), static_layer=None, alpha=0.1,
                        contrast_weight=1.0, bucket=None, n_buckets=None,
                        sources=dict.fromkeys(("mode", "layers", "alpha", "contrast_weight"), "default"))


def index_settings(manifest: Manifest, calibration=None, root="", warn: bool = True, given: DoLaSettings | None = None,
                   **flags) -> DoLaSettings:
    """Search-time settings: `given` (already resolved), else flags > `calibration` > the index's stored settings >
    defaults; ValueError naming the layers the index lacks."""
    settings = given
    if settings is None:
        inherited = stored_settings(manifest) if calibration is None else None
        settings = resolve_settings(manifest.num_layers, calibration=calibration, model_id=manifest.model_id,
                                    task=RETRIEVAL, inherited=inherited, warn=warn, **flags)
    missing = [j for j in settings.layers if j not in manifest.layers]
    if missing:
        origin = settings.sources["layers"] + (f" {settings.calibration!r}" if settings.calibration else "")
        raise ValueError(f"index {str(root)!r} stores layers {manifest.layers}, but the settings need layers "
                         f"{missing} (layers from: {origin}); pass layers= / static_layer= from "
                         f"{manifest.layers}, or rebuild the index with these settings (siglip-dola index build "
                         f"... with the same calibration / layers)")
    return settings


def _new_manifest(model, settings: DoLaSettings) -> Manifest:
    readout = model.readout
    preprocessing = f"image_size={tuple(readout.image_size)}; {model.preprocess!r}".replace("\n", " ")
    preprocessing = re.sub(r" at 0x[0-9a-fA-F]+", "", preprocessing)  # a bare function's repr carries its address
    return Manifest(model_id=model.model_id, layers=list(settings.layers), num_layers=int(readout.num_layers),
                    embed_dim=int(readout.embed_dim), logit_scale=float(model.logit_scale),
                    preprocessing=preprocessing[:2000], weights_fingerprint=weights_fingerprint(model),
                    settings=settings.to_json())

def _vectors_from(embeddings) -> np.ndarray:
    """Embeddings(z_final [n, D], z_layers [J, n, D]) -> L2-normalised float32 [n, 1+J, D]."""
    stacked = torch.cat([embeddings.z_final.unsqueeze(0), embeddings.z_layers], dim=0)  # (1+J, n, D)
    stacked = torch.nn.functional.normalize(stacked.float(), dim=-1)
    return stacked.permute(1, 0, 2).contiguous().numpy()  # (n, 1+J, D)


def _find_done(root: Path, name: str, store: LayerStore) -> bool:
    """True if a complete segment `name` is staged for `store`, or committed with its fp16 vectors (a compressed
    store's committed segments keep no fp16 vectors to re-encode or add to a new first stage: they are embedded again)."""
    committed = root / storage.SEGMENTS / name
    return (segment.staged_for(root / storage.STAGING / name, store)
            or (segment.read_segment_meta(committed) is not None and (committed / storage.VECTORS).is_file()))


def _embed_chunks(root: Path, model, paths: list[str], layers: list[int], batch_size: int,
                  chunk_size: int, progress: bool, image_root: str, store: LayerStore,
                  decode: str = "cpu") -> tuple[list[str], list[str]]:
    """Embed this rank's chunks of `paths` into staged segments, skipping finished ones: (all names, own names).

    Under torchrun each rank takes a contiguous run of chunks and writes its segments itself (no rank
    holds more than a chunk). Rank 0's progress bar (stderr) counts its own images, the reused ones
    included, with an ETA; segment paths are stored relative to `image_root`.
    """
    from tqdm.auto import tqdm

    chunks = [paths[i:i + chunk_size] for i in range(0, len(paths), chunk_size)]
    names = [storage.segment_key(model.model_id, layers, chunk) for chunk in chunks]
    rank, world = distributed.rank_and_world()
    first, stop = distributed.shard_bounds(len(chunks), rank, world)
    mine = list(range(first, stop))
    done = {i: _find_done(root, names[i], store) for i in mine}
    reused = sum(len(chunks[i]) for i in mine if done[i])
    main = distributed.is_main_process()
    if reused:
        print(f"index: rank {rank} reusing {sum(done.values())} finished segment(s) ({reused} images) already "
              f"embedded in {root} (by an interrupted or earlier run)", file=sys.stderr)
    with tqdm(total=sum(len(chunks[i]) for i in mine), initial=reused, desc="indexing", unit="img", file=sys.stderr,
              disable=not (progress and main)) as bar:
        for i in mine:
            if done[i]:
                continue
            embeddings = embed_images(model, chunks[i], layers, batch_size=batch_size, progress=bar, shard=False,
                                      decode=decode)
            relative = [os.path.relpath(p, image_root) for p in embeddings.ids]
            segment.write_segment(root / storage.STAGING / names[i], _vectors_from(embeddings), relative,
                                  embeddings.skipped, store)
    return names, [names[i] for i in mine]


def _segment_entries(root: Path, names: list[str]) -> list[tuple[dict, dict]]:
    """Promote staged segments; [(manifest entry, meta)] in order."""
    entries = []
    for name in names:
        if segment.read_segment_meta(root / storage.STAGING / name) is not None:
            storage.promote_segment(root, name)
        meta = segment.read_segment_meta(root / storage.SEGMENTS / name)
        assert meta is not None, f"segment {name} vanished before commit"
        entries.append(({"name": name, "count": meta["count"], "sha256": meta["sha256"], "bytes": meta["bytes"]}, meta))
    return entries


def _merge_skipped(old: list, metas: list[dict], indexed: set[str]) -> list[list[str]]:
    """Skipped files (path, error), latest error per path, minus paths that are now indexed."""
    skipped = {path: error for path, error in old}
    for meta in metas:
        skipped.update({path: error for path, error in meta["skipped"]})
    return [[path, error] for path, error in skipped.items() if path not in indexed]


def _finish(root: Path, manifest: Manifest, names: list[str], metas: list[dict], first, extra: dict) -> Manifest:
    """Rank 0, after training and encoding: promote segments, write the FAISS file and codec, then the manifest."""
    if not manifest.count and not any(meta["count"] for meta in metas):
        indexed = _indexed_paths(root, manifest)
        skipped = _merge_skipped(manifest.skipped, metas, indexed)
        from siglip_dola.failures import all_failed_message

        why = all_failed_message("images", skipped) if skipped else "no image was given"
        raise ValueError(f"index: no image could be indexed, nothing was written to {str(root)!r}: {why}")
    entries = _segment_entries(root, names)
    manifest.segments = manifest.segments + [entry for entry, meta in entries if entry["count"]]
    manifest.count = sum(seg["count"] for seg in manifest.segments)
    manifest.checksum = storage.index_checksum(manifest.segments)
    manifest.skipped = _merge_skipped(manifest.skipped, [meta for _, meta in entries], _indexed_paths(root, manifest))
    if extra["codec"] and not manifest.layer_codec_file:
        manifest.layer_codec_file, manifest.layer_codec_sha256 = storage.write_file(root, "layers", extra["codec"])
    manifest.first_stage = extra["first_stage"]
    manifest.format_version = storage.FORMAT_VERSION
    manifest.faiss_file, manifest.faiss_lists_file, manifest.faiss_blocks = faiss_store.write(root, manifest, first)
    manifest.faiss_sha256 = ""  # superseded by faiss_blocks (format 4)
    storage.write_manifest(root, manifest)
    storage.remove_unreferenced(root, manifest)
    return manifest


def commit_segments(root: Path, manifest: Manifest, names: list[str], owned: list[str],
                    options: StoreOptions) -> Manifest:
    """Every rank: train, encode, merge and commit the staged segments `names` (this rank wrote `owned`)."""
    return commit(root, manifest, names, owned, options,
                  lambda *args: _finish(root, *args))


def _indexed_paths(root: Path, manifest: Manifest, image_root: str | None = None) -> set[str]:
    """Absolute paths held by the manifest's segments (relative ones joined to the image root)."""
    paths: set[str] = set()
    for seg in manifest.segments:
        meta = segment.read_segment_meta(root / storage.SEGMENTS / seg["name"])
        if meta is None:
            raise storage.IndexCorruptError(root, f"{storage.SEGMENTS}/{seg['name']}/{segment.META}",
                                            "missing or unreadable")
        paths.update(absolute_paths(meta["paths"], image_root or manifest.image_root))
    return paths

def _common_root(paths: list[str]) -> str:
    """The deepest folder holding every path (the recorded image root)."""
    return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""


def _resolved(images) -> list[str]:
    """Absolute path strings of the image files named by `images` (files, folders, globs)."""
    return [str(p.resolve()) for p in expand_image_paths(images)]


def _ingest(root: Path, model, paths: list[str], manifest: Manifest, options: StoreOptions, batch_size: int,
            chunk_size: int, progress: bool, decode: str = "cpu") -> Manifest:
    """Embed `paths` into segments (each rank its own) and commit them on top of `manifest` (every rank returns it)."""
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_options(options, manifest.embed_dim)
    check_decode(decode, model.device)
    with _rank0_lock(root):
        embedded = {}
        store = layer_store.store_named(options.layer_store, 1 + len(manifest.layers), manifest.embed_dim)

        def embed():
            embedded["names"], embedded["owned"] = _embed_chunks(root, model, paths, manifest.layers, batch_size,
                                                                 chunk_size, progress, manifest.image_root, store,
                                                                 decode)
        all_ok(guarded(embed))  # also the barrier: every rank's segments are written before the commit reads them
        return commit_segments(root, manifest, embedded["names"], embedded["owned"], options)


def _rank0_then_all(work, wrap, what: str):
    """Run `work` on rank 0 and give every rank `wrap(result)`; rank 0's error reaches every rank."""
    result = None
    if distributed.is_main_process():
        try:
            result = work()
        except Exception as err:  # tell the other ranks instead of leaving them waiting
            distributed.broadcast_from_rank0(f"{type(err).__name__}: {err}")
            raise
    result = distributed.broadcast_from_rank0(result)
    if isinstance(result, str):
        raise RuntimeError(f"index: rank 0 failed to {what}: {result}")
    return wrap(result)


class _rank0_lock:
    """The index's writer lock, taken by rank 0 (the only writer); its failure stops every rank."""

    def __init__(self, root: Path):
        self.lock = storage.writer_lock(root) if distributed.is_main_process() else None

    def __enter__(self):
        _rank0_then_all(lambda: self.lock.__enter__() and None, lambda _: None, "lock the index")

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc) if self.lock is not None else False


def build_index(images, out, model, layers=None, bucket=None, batch_size: int = 32,
                chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = True, overwrite: bool = False, *, calibration=None,
                mode=None, alpha=None, contrast_weight=None, static_layer=None, n_buckets=None,
                store_options: StoreOptions | None = None, decode: str = "cpu") -> Manifest:
    """Embed every image once and write a new index at `out` (replacing an old one only at commit).

    images: files / folders / globs; model: a LoadedModel. The DoLa settings (siglip_dola.settings: these
    flags > `calibration` > the model's own, e.g. the embedded model's shipped retrieval calibration >
    defaults) are stored in the manifest with the layers they read next to the final embedding. An existing
    index at `out` is replaced only with overwrite=True (to extend one, use add_to_index). Paths are stored
    relative to the images' common folder, recorded as the manifest's image_root. store_options: the layer
    store and the first stage (index_options.StoreOptions: layer_store, index_factory, index_memory, target_recall).
    decode: where JPEGs are decoded, 'cpu' (PIL) or 'gpu' (nvJPEG, CUDA only; see embed_images).
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"out must be a folder (the index), got existing file {str(root)!r}")
    if (root / storage.MANIFEST).exists() and not overwrite:
        raise ValueError(f"{str(root)!r} already holds an index: pass overwrite=True to "
                         f"replace it, or add images with `siglip-dola index add {root} IMAGES`")
    settings = settings_for_model(model, calibration, task=RETRIEVAL, mode=mode, layers=layers, bucket=bucket,
                                  n_buckets=n_buckets, static_layer=static_layer, alpha=alpha,
                                  contrast_weight=contrast_weight)
    paths = _resolved(images)
    manifest = _new_manifest(model, settings)
    manifest.image_root = _common_root(paths)
    return _ingest(root, model, paths, manifest, store_options or StoreOptions(), batch_size, chunk_size, progress,
                   decode)


def add_to_index(index, images, model, batch_size: int = 32, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 progress: bool = True, image_root: str | None = None, calibration=None,
                 decode: str = "cpu") -> Manifest:
    """Add the images not yet indexed to the index at `index`; same weights and layers as the index.

    image_root: where the indexed images are now, when their folder moved (recorded in the manifest).
    `calibration` (optional) is checked against the stored layers, so a later search with it works.
    """
    root = Path(index)
    manifest = storage.read_manifest(root)
    check_compatible(manifest, model, root=root)
    if image_root is not None:
        check_relocatable(manifest, root)
        manifest.image_root = str(Path(image_root).resolve())
    if calibration is not None:
        index_settings(manifest, calibration, root=root)
    indexed = _indexed_paths(root, manifest)
    paths = [p for p in _resolved(images) if p not in indexed]
    if not paths:
        return manifest
    return _ingest(root, model, paths, manifest, StoreOptions(layer_store=manifest.layer_store), batch_size,
                   chunk_size, progress, decode)
