"""On-disk layout of a retrieval index: immutable segments of fp16 vectors + a manifest that commits them.

    INDEX/
      manifest.json                 the commit point (written last, atomically); lists the live segments
      final-<checksum>.faiss        FAISS inner-product index over the final embeddings, in segment order
      segments/seg-<key>/           one immutable chunk of images:
          vectors.npy               [n, 1+J, D] float16, L2-normalised; row 0 = final layer, rows 1..J = `layers`
          meta.json                 {"paths": [...], "skipped": [[path, error], ...], "count", "sha256"}
      .staging/seg-<key>/           segments of a build or add that has not been committed yet (resume)

A segment directory is complete once its meta.json exists (written last, atomically). Its key hashes
the model id, the layers and the (path, size, mtime) of the chunk's files, so a rerun after a crash
finds and reuses the segments it already wrote. Vectors are read with ``np.load(mmap_mode="r",
allow_pickle=False)`` so a 1M-image gallery needs no RAM for its layer embeddings.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from siglip_dola.io import atomic_path, write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
STAGING = ".staging"
VECTORS = "vectors.npy"
META = "meta.json"
LAYOUT = "vectors.npy [n, 1+J, D] float16, L2-normalised; row 0 final layer, rows 1..J the manifest's layers"


@dataclass
class Manifest:
    """What an index holds and how it was made; `segments` [{name, count, sha256}] in id order."""
    model_id: str
    layers: list[int]
    num_layers: int
    embed_dim: int
    logit_scale: float
    preprocessing: str
    count: int = 0
    checksum: str = ""
    faiss_file: str = ""
    segments: list[dict] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)
    layout: str = LAYOUT
    format_version: int = FORMAT_VERSION
    settings: dict | None = None  # DoLaSettings.to_json() the index was built with (None: built before settings)

    def to_json(self) -> dict:
        """The manifest as a JSON-ready dict."""
        return asdict(self)


def read_manifest(root: Path) -> Manifest:
    """Load INDEX/manifest.json; FileNotFoundError if `root` holds no committed index."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"index: {str(root)!r} holds no index (no {MANIFEST}); build one with `siglip-dola index build`")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"index: {str(root)!r} has format_version {data.get('format_version')!r}; "
                         f"this siglip-dola reads format_version {FORMAT_VERSION} only (rebuild the index)")
    return Manifest(**data)


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


def write_segment(folder: Path, vectors: np.ndarray, paths: list[str], skipped: list) -> dict:
    """Write one segment (vectors [n, 1+J, D] -> float16) into `folder`; meta.json last marks it complete."""
    assert vectors.ndim == 3 and vectors.shape[0] == len(paths), "vectors must be [n, 1+J, D] for n paths"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / VECTORS) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(vectors, dtype=np.float16), allow_pickle=False)
    meta = {"count": len(paths), "sha256": _file_sha256(folder / VECTORS),
            "paths": list(paths), "skipped": [list(s) for s in skipped]}
    write_json_atomic(folder / META, meta)
    return meta


def read_segment_meta(folder: Path) -> dict | None:
    """The segment's meta.json, or None when the segment is missing or incomplete."""
    path = folder / META
    if not path.is_file() or not (folder / VECTORS).is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def open_vectors(folder: Path) -> np.ndarray:
    """Memory-mapped [n, 1+J, D] float16 vectors of a segment (no pickle)."""
    return np.load(folder / VECTORS, mmap_mode="r", allow_pickle=False)


def verify_segment(folder: Path, expected_sha256: str) -> None:
    """Raise ValueError when the segment's vectors file does not match its recorded checksum."""
    actual = _file_sha256(folder / VECTORS)
    if actual != expected_sha256:
        raise ValueError(f"index: segment {folder.name} is corrupt (sha256 {actual[:12]}..., manifest says "
                         f"{expected_sha256[:12]}...); rebuild the index")


def promote_segment(root: Path, name: str) -> None:
    """Move a completed staged segment into INDEX/segments/ (replacing an unreferenced leftover copy)."""
    source, target = root / STAGING / name, root / SEGMENTS / name
    if not source.is_dir():
        return  # already promoted by an earlier, interrupted commit
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)


def remove_unreferenced(root: Path, manifest: Manifest) -> None:
    """After a commit: delete segments and FAISS files the manifest no longer names, and the staging folder."""
    live = {seg["name"] for seg in manifest.segments}
    for folder in (root / SEGMENTS).glob("seg-*"):
        if folder.name not in live:
            shutil.rmtree(folder, ignore_errors=True)
    for faiss_file in root.glob("final-*.faiss"):
        if faiss_file.name != manifest.faiss_file:
            faiss_file.unlink(missing_ok=True)
    shutil.rmtree(root / STAGING, ignore_errors=True)
