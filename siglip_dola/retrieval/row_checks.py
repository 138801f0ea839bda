"""Checksums per block of rows, checked on every read: a rerank hashes only the K records it reads.

A block is one image's record (its 1+J stored vectors, across the store's files): a rerank reads
scattered records, so a larger block would hash (and read) rows nobody asked for. xxh3-64 (the
``xxhash`` package) costs about a microsecond per 8 KB record; the digests are 8 bytes an image, in
``checksums.npy`` [n] uint64 beside the store files, whose own xxh3-128 digest is in meta.json (checked
when the segment is opened).
"""
from __future__ import annotations

import numpy as np
import xxhash

ALGORITHM = "xxh3_64"
BLOCK_ROWS = 1
FILE = "checksums.npy"


def record_digests(arrays: list[np.ndarray]) -> np.ndarray:
    """uint64 [n]: xxh3-64 over each record's bytes in every array (first axis n), in order."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    n = arrays[0].shape[0]
    out = np.empty(n, dtype=np.uint64)
    for i in range(n):
        digest = xxhash.xxh3_64()
        for array in arrays:
            digest.update(array[i].data)
        out[i] = digest.intdigest()
    return out


def file_digest(array: np.ndarray) -> str:
    """xxh3-128 hex digest of the checksum array's bytes (the checksum of the checksums)."""
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array).data)


def bad_records(arrays: list[np.ndarray], expected: np.ndarray) -> np.ndarray:
    """Positions (into the first axis) whose records do not hash to `expected` [k]."""
    return np.nonzero(record_digests(arrays) != np.asarray(expected, dtype=np.uint64))[0]
