"""Checksums per block of a FAISS file: what an open reads is checked at open, the rest by ``index verify``.

A sha256 over the whole FAISS file on every open costs seconds at 10M images (and reads pages a memory-mapped
search never touches). Instead the build records, per file, its size and an xxh3-64 digest of every
``BLOCK_BYTES`` block (8 bytes per 4 MiB: 2.8 KB of manifest for a 1.4 GB file):

- every open checks each file's size (a truncated or extended file) and every block of the files FAISS reads
  into RAM (the exact first stage, or an IVF index's quantiser, codebooks and list directory): xxh3 runs at
  several GB/s, a fraction of FAISS's own read of the same bytes;
- the inverted lists of an IVF index (``final-*.ivfdata``), memory-mapped and read list by list by a search,
  are checked block by block by ``index verify`` (``check(..., every_block=True)``).
"""
from __future__ import annotations

from pathlib import Path

import xxhash

from siglip_dola.retrieval.storage import IndexCorruptError

ALGORITHM = "xxh3_64"
BLOCK_BYTES = 1 << 22


def digests(path: Path) -> dict:
    """{"bytes": size, "blocks": [xxh3-64 hex of each BLOCK_BYTES block]} of the file at `path`."""
    blocks = []
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            blocks.append(xxhash.xxh3_64_hexdigest(block))
    return {"bytes": Path(path).stat().st_size, "blocks": blocks}


def record(root: Path, names: list[str]) -> dict:
    """The manifest's `faiss_blocks`: algorithm, block size and each file's digests."""
    return {"algorithm": ALGORITHM, "block_bytes": BLOCK_BYTES,
            "files": {name: digests(Path(root) / name) for name in names}}


def check(root: Path, recorded: dict, name: str, every_block: bool) -> None:
    """IndexCorruptError naming `name` unless its size matches and (every_block) each block's digest does."""
    path = Path(root) / name
    expected = recorded["files"].get(name)
    if expected is None:
        raise IndexCorruptError(root, name, "the manifest records no checksums for it")
    if not path.is_file():
        raise IndexCorruptError(root, name, "missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise IndexCorruptError(root, name, f"{size} bytes, the manifest recorded {expected['bytes']}")
    if not every_block:
        return
    block_bytes = int(recorded["block_bytes"])
    with open(path, "rb") as handle:
        for number, digest in enumerate(expected["blocks"]):
            if xxhash.xxh3_64_hexdigest(handle.read(block_bytes)) != digest:
                raise IndexCorruptError(root, name, f"bytes {number * block_bytes}..{(number + 1) * block_bytes - 1} do "
                                        f"not match their {recorded['algorithm']} checksum")
