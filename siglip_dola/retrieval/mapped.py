"""Layer-store files memory-mapped for random reads: a search reads a few records scattered over the store.

The kernel's read-around fills a page fault of a file mapping with up to ``read_ahead_kb`` around it (8 MB on
common virtual disks): over a store larger than RAM, 400 scattered records then read ~3 GB and took seconds
on a cold page cache. ``MADV_RANDOM`` turns that off (one page a fault), and ``prefetch`` asks for every
page a read will touch at once (``MADV_WILLNEED``), so the disk serves them concurrently instead of one
fault at a time. Where ``madvise`` is missing (not Linux / macOS) both are skipped: reads stay correct.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

_ADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_RANDOM") and hasattr(mmap, "MADV_WILLNEED")


def map_npy(path: Path) -> np.ndarray:
    """The .npy array at `path`, memory-mapped read-only for random reads (ValueError: not a plain npy array;
    TypeError: the file is shorter than its header says)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if dtype.hasobject:
            raise ValueError("holds Python objects (pickled); a layer store holds numbers only")
        offset = handle.tell()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if _ADVISE:
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


def prefetch(arrays: list[np.ndarray], rows: np.ndarray) -> None:
    """Ask the kernel for the pages of `rows` (first-axis indexes) of each mapped C-ordered array, all at once."""
    if not _ADVISE or not len(rows):
        return
    page = mmap.PAGESIZE
    for array in arrays:
        mapped = array.base
        if not isinstance(mapped, mmap.mmap) or not array.flags.c_contiguous or not array.size:
            continue
        stride = array.strides[0]
        first = array.__array_interface__["data"][0] - np.frombuffer(mapped, np.uint8, count=1).__array_interface__["data"][0]
        for start in (first + np.asarray(rows, dtype=np.int64) * stride).tolist():
            aligned = start - start % page
            mapped.madvise(mmap.MADV_WILLNEED, aligned, start + stride - aligned)
