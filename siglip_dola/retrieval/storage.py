"""On-disk layout of a retrieval index: immutable segments of fp16 vectors + a manifest that commits them.

    INDEX/
      manifest.json                 the commit point (written last, atomically); lists the live segments
      final-<checksum>.faiss        FAISS inner-product index over the final embeddings, in segment order
      final-<checksum>.ivfdata      its inverted lists, when IVF (merged on disk; FAISS's on-disk lists)
      segments/seg-<key>/           one immutable chunk of images:
          vectors.npy               [n, 1+J, D] float16, L2-normalised; row 0 = final layer, rows 1..J = `layers`
                                    (other layer stores: int8.npy + scales.npy, or pqM.npy; see layer_store.py)
          checksums.npy             [n] uint64 xxh3 of each image's record (format 3; see row_checks.py)
          meta.json                 {"paths": [...], "skipped": [[path, error], ...], "count", "sha256", "store", "checksums"}
      layers-<sha>.faiss            the trained PQ codec of a pq layer store
      .staging/seg-<key>/           segments of a build or add that has not been committed yet (resume)
      .lock                         held (flock) by the one process writing the index

Paths in meta.json are relative to the manifest's `image_root` (format 2), so a moved image folder is
found again with `open_index(..., image_root=NEW)`; format 1 indexes stored absolute paths.

Integrity: every open checks each segment's file sizes, npy headers (dtype, shape), path count and the
digest of its checksums file, and the FAISS files' sizes and per-block xxh3 checksums of what FAISS reads
into RAM (file_blocks.py); every read of K records checks their xxh3 checksums (segment.py); `verify_index`
also re-hashes every store file and every block of the memory-mapped inverted lists.

A segment directory is complete once its meta.json exists (written last, atomically). Its key hashes
the model id, the layers and the (path, size, mtime) of the chunk's files, so a rerun after a crash
finds and reuses the segments it already wrote. Vectors are read with ``np.load(mmap_mode="r",
allow_pickle=False)`` so a 1M-image gallery needs no RAM for its layer embeddings.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from siglip_dola.io import atomic_path, write_json_atomic

FORMAT_VERSION = 4
# 1: absolute paths, no FAISS hash / sizes / weights fingerprint; 2: fp16 store, exact first stage, no row checksums;
# 3: the FAISS file's sha256 (checked whole on every open), IVF lists inside it
READABLE_VERSIONS = (1, 2, 3, 4)
LOCK = ".lock"
MANIFEST = "manifest.json"
SEGMENTS = "segments"
STAGING = ".staging"
VECTORS = "vectors.npy"
META = "meta.json"
LAYOUT = "vectors.npy [n, 1+J, D] float16, L2-normalised; row 0 final layer, rows 1..J the manifest's layers"


@dataclass
class Manifest:
    """What an index holds and how it was made; `segments` [{name, count, sha256, bytes}] in id order."""
    model_id: str
    layers: list[int]
    num_layers: int
    embed_dim: int
    logit_scale: float
    preprocessing: str
    count: int = 0
    checksum: str = ""
    faiss_file: str = ""
    faiss_sha256: str = ""
    image_root: str = ""           # folder the segments' paths are relative to ("" in format 1: absolute)
    weights_fingerprint: str = ""  # content hash of the weights (see index.weights_fingerprint)
    segments: list[dict] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)
    layout: str = LAYOUT
    format_version: int = FORMAT_VERSION
    settings: dict | None = None  # DoLaSettings.to_json() the index was built with (None: built before settings)
    layer_store: str = "fp16"      # layer_store.py: fp16 | int8 | pqM
    layer_codec_file: str = ""     # the trained PQ codec (pq stores), and its sha256
    layer_codec_sha256: str = ""
    first_stage: dict | None = None  # first_stage.py: {factory, search_params, recall, k, trained_on, ...}; None: exact
    faiss_lists_file: str = ""     # final-<checksum>.ivfdata: an IVF first stage's on-disk inverted lists (format 4)
    faiss_blocks: dict | None = None  # file_blocks.py: sizes and per-block xxh3 of the FAISS files (format 4)

    def to_json(self) -> dict:
        """The manifest as a JSON-ready dict."""
        return asdict(self)


def read_manifest(root: Path) -> Manifest:
    """Load INDEX/manifest.json; FileNotFoundError if `root` holds no committed index."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"index: {str(root)!r} holds no index (no {MANIFEST}); build one with `siglip-dola index build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexCorruptError(root, MANIFEST, f"not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format_version") not in READABLE_VERSIONS:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ValueError(f"index: {str(root)!r} has format_version {version!r}; this siglip-dola reads "
                         f"format_version {list(READABLE_VERSIONS)} (rebuild the index)")
    try:
        return Manifest(**data)
    except TypeError as err:  # missing or unknown keys
        raise IndexCorruptError(root, MANIFEST, str(err)) from None


class IndexCorruptError(ValueError):
    """A file of an index is missing, truncated or does not match what the manifest recorded."""

    def __init__(self, root, name: str, reason: str):
        self.root, self.file = Path(root), Path(root) / name
        super().__init__(f"index {str(root)!r}: {self.file} is corrupt or incomplete ({reason}); rebuild the "
                         f"index: siglip-dola index build IMAGES --out {root} --overwrite")


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Commit `manifest` atomically: readers see the old or the new index, never a mix."""
    write_json_atomic(Path(root) / MANIFEST, manifest.to_json())


def index_checksum(segments: list[dict]) -> str:
    """sha256 over the ordered (name, sha256) of the segments: identifies the index content."""
    digest = hashlib.sha256()
    for seg in segments:
        digest.update(f"{seg['name']}:{seg['sha256']}\n".encode())
    return digest.hexdigest()


def segment_key(model_id: str, layers: list[int], paths: list[str]) -> str:
    """Name of the segment holding `paths`: changes with the model, the layers or any file's size/mtime."""
    digest = hashlib.sha256(f"{model_id}\n{layers}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:  # a missing file still gets a stable key; embedding reports it as skipped
            digest.update(f"{path}\t-\n".encode())
    return "seg-" + digest.hexdigest()[:24]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(root: Path, name: str, expected_sha256: str) -> None:
    """IndexCorruptError unless the file `root/name` exists and has the recorded sha256."""
    path = Path(root) / name
    if not path.is_file():
        raise IndexCorruptError(root, name, "missing")
    actual = _file_sha256(path)
    if actual != expected_sha256:
        raise IndexCorruptError(root, name, f"sha256 {actual[:12]}..., the manifest recorded {expected_sha256[:12]}...")


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 4 MiB blocks."""
    return _file_sha256(Path(path))


def promote_segment(root: Path, name: str) -> None:
    """Move a completed staged segment into INDEX/segments/ (replacing an unreferenced leftover copy)."""
    source, target = root / STAGING / name, root / SEGMENTS / name
    if not source.is_dir():
        return  # already promoted by an earlier, interrupted commit
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)


def write_file(root: Path, prefix: str, data: bytes) -> tuple[str, str]:
    """Write `data` atomically as INDEX/<prefix>-<sha16>.faiss; (file name, sha256)."""
    sha256 = hashlib.sha256(data).hexdigest()
    name = f"{prefix}-{sha256[:16]}.faiss"
    with atomic_path(Path(root) / name) as tmp:
        Path(tmp).write_bytes(data)
    return name, sha256


def remove_unreferenced(root: Path, manifest: Manifest) -> None:
    """After a commit: delete segments and FAISS files the manifest no longer names, the staged fp16
    vectors of a compressed layer store, and the staging folder."""
    live = {seg["name"] for seg in manifest.segments}
    for folder in (root / SEGMENTS).glob("seg-*"):
        if folder.name not in live:
            shutil.rmtree(folder, ignore_errors=True)
        elif manifest.layer_store != "fp16":
            (folder / VECTORS).unlink(missing_ok=True)
    for pattern in ("final-*.faiss", "final-*.ivfdata", "layers-*.faiss"):
        for faiss_file in root.glob(pattern):
            if faiss_file.name not in (manifest.faiss_file, manifest.faiss_lists_file, manifest.layer_codec_file):
                faiss_file.unlink(missing_ok=True)
    shutil.rmtree(root / STAGING, ignore_errors=True)


@contextmanager
def writer_lock(root: Path):
    """Hold an exclusive lock on INDEX/.lock while building or adding: a second writer fails at once.

    flock locks die with their process, so a crashed build never leaves a stale lock behind.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"index {str(root)!r} is being written by another siglip-dola process "
                               f"(it holds {root / LOCK}); wait for it to finish, then rerun") from None
        yield
    finally:
        handle.close()  # releases the lock
