"""One segment's files: the staged fp16 vectors, the encoded layer store, its row checksums, and their checks.

A build writes each chunk as ``vectors.npy`` (fp16) + meta.json (``write_segment``; meta.json last marks
it complete, so a crashed build resumes). The commit then encodes it into the index's layer store and
writes ``checksums.npy`` (``encode_segment``), recording the store, its files' sha256 and the checksum
file's digest in meta.json. A store that needs no training (``streams``: int8, int4 and their pairs) is
encoded as the chunk is written, and only the final rows are staged in fp16 (the first stage trains on,
adds and is tuned from them): 2 KB an image at D=1024 instead of 2 (1+J) KB, which is what bounds a
10M-image build's disk. Opening checks sizes, headers and the checksum file (``check_segment``);
reading K records checks their checksums (``opened.py``); ``verify_segment`` re-hashes the store files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from siglip_dola.io import atomic_path, write_json_atomic
from siglip_dola.retrieval import row_checks
from siglip_dola.retrieval import layer_store, mapped, storage
from siglip_dola.retrieval.layer_store import FP16_FILE, LayerStore
from siglip_dola.retrieval.storage import IndexCorruptError

META = "meta.json"


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def files_sha256(paths: list[Path]) -> str:
    """sha256 over the files' bytes, in order (one file: its plain sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def streams(store: LayerStore) -> bool:
    """True if `store` is encoded when a chunk is written (no codec to train, and not the staged fp16 itself)."""
    return not store.needs_training and FP16_FILE not in [name for name, _, _ in store.files]


def write_segment(folder: Path, vectors: np.ndarray, paths: list[str], skipped: list,
                  store: LayerStore | None = None) -> dict:
    """Stage one segment (vectors [n, 1+J, D] unit) in `folder`; meta.json last marks it complete.

    Without `store` (or one that does not stream): every row as float16, encoded at commit. With a streaming
    `store`: its files and checksums now, and only the final rows [n, 1, D] staged as float16."""
    assert vectors.ndim == 3 and vectors.shape[0] == len(paths), "vectors must be [n, 1+J, D] for n paths"
    if folder.exists():  # a segment staged for another store, or half-written, is replaced whole
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    streamed = store is not None and streams(store)
    _save(folder / FP16_FILE, np.asarray(vectors[:, :1] if streamed else vectors, dtype=np.float16))
    meta = {"count": len(paths), "sha256": files_sha256([folder / FP16_FILE]),
            "bytes": (folder / FP16_FILE).stat().st_size, "paths": list(paths), "skipped": [list(s) for s in skipped]}
    if streamed:
        rounded = np.asarray(vectors, dtype=np.float16).astype(np.float32)  # as encode_segment reads the staging
        arrays = store.encode(rounded) if len(paths) else [
            np.empty((0, *shape), dtype) for _, dtype, shape in store.files]
        _write_store(folder, store, arrays, meta)
        meta["staged_final_only"] = True
    write_json_atomic(folder / META, meta)
    return meta


def staged_for(folder: Path, store: LayerStore) -> bool:
    """True if the complete staged segment in `folder` can be committed into `store` (a resumed build reuses it):
    staged whole in fp16 (any store), or already encoded into this very store."""
    meta = read_segment_meta(folder)
    return meta is not None and (not meta.get("staged_final_only") or meta.get("store") == store.name)


def read_segment_meta(folder: Path) -> dict | None:
    """The segment's meta.json, or None when the segment is missing or incomplete (unreadable counts too)."""
    path = folder / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("paths"), list) else None


def _name(root: Path, folder: Path, name: str) -> str:
    return f"{folder.relative_to(root)}/{name}" if folder.is_relative_to(root) else str(folder / name)


def _load(root: Path, folder: Path, name: str, random: bool = False) -> np.ndarray:
    """`name` memory-mapped: for sequential reads (the staged vectors), or `random` ones (a store's records)."""
    try:
        return mapped.map_npy(folder / name) if random else np.load(folder / name, mmap_mode="r", allow_pickle=False)
    except (ValueError, TypeError, OSError, EOFError) as err:  # truncated: "mmap length is greater than file size"
        raise IndexCorruptError(root, _name(root, folder, name), str(err)) from None


def staged_vectors(folder: Path) -> np.ndarray:
    """The staged fp16 [n, 1+J, D] vectors of a segment, memory-mapped."""
    return _load(folder.parent.parent, folder, FP16_FILE)


def encode_segment(folder: Path, store: LayerStore, chunk: int = 16384) -> dict:
    """Encode the staged fp16 vectors into `store`'s files + checksums.npy; meta.json records them. Idempotent."""
    meta = read_segment_meta(folder)
    if meta.get("store") == store.name and meta.get("codec") == _codec_id(store):
        return meta
    raw = staged_vectors(folder)
    if raw.shape[1] != store.rows:  # staged final rows only, for another store: `staged_for` keeps this out
        raise IndexCorruptError(folder.parent.parent, _name(folder.parent.parent, folder, FP16_FILE),
                                f"stages {raw.shape[1]} row(s) an image for store {meta.get('store')!r}, "
                                f"not the {store.rows} store {store.name!r} encodes")
    parts = [[] for _ in store.files]
    for start in range(0, raw.shape[0], chunk):
        for part, array in zip(parts, store.encode(np.asarray(raw[start:start + chunk], dtype=np.float32))):
            part.append(array)
    arrays = [np.concatenate(p) if p else np.empty((0, *shape), dtype) for p, (_, dtype, shape) in zip(parts, store.files)]
    _write_store(folder, store, arrays, meta)
    write_json_atomic(folder / META, meta)
    return meta


def _write_store(folder: Path, store: LayerStore, arrays: list[np.ndarray], meta: dict) -> None:
    """Write `store`'s files (arrays in `store.files` order) and their row checksums; record them in `meta`."""
    for (name, _, _), array in zip(store.files, arrays):
        if name != FP16_FILE:
            _save(folder / name, array)
    digests = row_checks.record_digests(arrays)
    _save(folder / row_checks.FILE, digests)
    names = [folder / name for name, _, _ in store.files]
    meta.update(store=store.name, codec=_codec_id(store), sha256=files_sha256(names),
                bytes=sum(p.stat().st_size for p in names),
                checksums={"algorithm": row_checks.ALGORITHM, "block_rows": row_checks.BLOCK_ROWS,
                           "file": row_checks.FILE, "xxh3_128": row_checks.file_digest(digests)})


def _codec_id(store: LayerStore) -> str:
    if store.codec is None:
        return ""
    return hashlib.sha256(layer_store.codec_bytes(store)).hexdigest()[:16]


def check_segment(root: Path, folder: Path, entry: dict, store: LayerStore):
    """The cheap check of every open: ([store arrays, memory-mapped], meta, checksums [n] or None).

    Checks that the files exist and parse, their total size (format >= 2), each file's dtype and shape,
    the path count, and (format 3) the checksum file against its digest in meta.json. Old segments
    without checksums give None (a read then cannot check records).
    """
    meta = read_segment_meta(folder)
    if meta is None:
        raise IndexCorruptError(root, _name(root, folder, META), "missing or unreadable")
    for name, _, _ in store.files:
        if not (folder / name).is_file():
            raise IndexCorruptError(root, _name(root, folder, name), "missing")
    size = sum((folder / name).stat().st_size for name, _, _ in store.files)
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise IndexCorruptError(root, _name(root, folder, store.files[0][0]),
                                f"{size} bytes, the manifest recorded {entry['bytes']}")
    arrays = []
    for name, dtype, shape in store.files:
        array = _load(root, folder, name, random=True)
        expected = (entry["count"], *shape)
        if array.dtype != dtype or array.shape != expected:
            raise IndexCorruptError(root, _name(root, folder, name),
                                    f"holds {array.dtype} {array.shape}, expected {dtype} {expected}")
        arrays.append(array)
    if len(meta["paths"]) != entry["count"]:
        raise IndexCorruptError(root, _name(root, folder, META), f"lists {len(meta['paths'])} paths, expected {entry['count']}")
    return arrays, meta, _checksums(root, folder, meta, entry["count"])


def _checksums(root: Path, folder: Path, meta: dict, count: int):
    info = meta.get("checksums")
    if not info:
        return None
    name = _name(root, folder, row_checks.FILE)
    if info.get("algorithm") != row_checks.ALGORITHM or info.get("block_rows") != row_checks.BLOCK_ROWS:
        raise IndexCorruptError(root, name, f"checksums {info.get('algorithm')!r} per {info.get('block_rows')} rows; "
                                f"this siglip-dola reads {row_checks.ALGORITHM} per {row_checks.BLOCK_ROWS}")
    if not (folder / row_checks.FILE).is_file():
        raise IndexCorruptError(root, name, "missing")
    digests = np.load(folder / row_checks.FILE, allow_pickle=False)
    if digests.dtype != np.uint64 or digests.shape != (count,) or row_checks.file_digest(digests) != info.get("xxh3_128"):
        raise IndexCorruptError(root, name, "does not match the digest meta.json recorded")
    return digests


def verify_segment(root: Path, folder: Path, store: LayerStore, expected_sha256: str) -> None:
    """IndexCorruptError when the segment's store files do not match their recorded sha256."""
    names = [folder / name for name, _, _ in store.files]
    for path in names:
        if not path.is_file():
            raise IndexCorruptError(root, _name(root, folder, path.name), "missing")
    actual = files_sha256(names)
    if actual != expected_sha256:
        raise IndexCorruptError(root, _name(root, folder, names[0].name),
                                f"sha256 {actual[:12]}..., the manifest recorded {expected_sha256[:12]}...")


def store_of(root: Path, manifest) -> layer_store.LayerStore:
    """The index's layer store, its PQ codec loaded (and sha256-checked) for pq stores."""
    store = layer_store.LayerStore(manifest.layer_store, 1 + len(manifest.layers), manifest.embed_dim)
    if store.needs_training:
        if manifest.layer_codec_sha256:
            storage.verify_file(root, manifest.layer_codec_file, manifest.layer_codec_sha256)
        layer_store.load_codec(store, (root / manifest.layer_codec_file).read_bytes())
    return store
