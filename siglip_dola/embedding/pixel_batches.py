"""Images -> PixelBatches on the device: the input half of the one image loop (embedding/images.py).

Files are decoded by `data.images.decode_image` (a bad file is reported, never raised) in DataLoader
worker processes; batches arrive in pinned memory and are uploaded on a side CUDA stream, so decoding
and the upload overlap the previous batch's forward.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from siglip_dola import distributed
from siglip_dola.data.gpu_decode import check_decode, iter_gpu_decoded
from siglip_dola.data.images import decode_image
from siglip_dola.data.pixel_split import split_preprocess
from siglip_dola.data.threads import available_cores, decode_worker_init, main_process_threads

MAX_WORKERS = 16       # decode processes per rank; past this the host copies, not decoding, limit
PREFETCH_BATCHES = 2   # batches each worker decodes ahead (each in shared memory: B x 3 x H x W, uint8 or fp32)


@dataclass
class PixelBatch:
    """One batch: pixels [B, 3, H, W] (None when every item failed) of `ids` at input positions `indices`."""
    indices: list[int]
    ids: list[str]
    pixels: torch.Tensor | None
    skipped: list[tuple[str, str]]   # (id, error)
    size: int                        # items consumed (good + skipped), for progress bars

    def pin_memory(self) -> "PixelBatch":
        """Called by the DataLoader's pinning thread."""
        pixels = None if self.pixels is None else self.pixels.pin_memory()
        return PixelBatch(self.indices, self.ids, pixels, self.skipped, self.size)



def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


def check_items(items) -> Sequence:
    """items as an indexable sequence of all paths or all (id, PIL image) pairs (TypeError otherwise)."""
    if isinstance(items, (str, os.PathLike)):
        raise TypeError("items must be a sequence of image paths or (id, PIL image) pairs, not a single path")
    if not isinstance(items, Sequence):
        items = list(items)
    if len(items) and not (_is_path(items[0]) or (isinstance(items[0], tuple) and len(items[0]) == 2)):
        raise TypeError(f"items must hold image paths or (id, PIL image) pairs, got {type(items[0]).__name__}")
    return items


def check_batch_size(batch_size) -> None:
    """ValueError unless batch_size is a positive int (bools are not sizes)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


class _Decoded(Dataset):
    """Item i -> (i, id, pixels [3, H, W] or the error as text) for paths or (id, PIL image) pairs."""

    def __init__(self, items: Sequence, preprocess):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        is_path = _is_path(item)
        item_id = str(item) if is_path else str(item[0])
        try:
            pixels = decode_image(item, self.preprocess) if is_path else self.preprocess(item[1].convert("RGB"))
        except Exception as err:  # noqa: BLE001 - one bad image must not end the pass
            return index, item_id, f"{type(err).__name__}: {err}"
        return index, item_id, pixels


def _collate(rows) -> PixelBatch:
    """Stack the good items of one batch; list the bad ones with their errors."""
    good = [row for row in rows if isinstance(row[2], torch.Tensor)]
    pixels = default_collate([row[2] for row in good]) if good else None  # (B, 3, H, W), in shared memory in a worker
    skipped = [(row[1], row[2]) for row in rows if not isinstance(row[2], torch.Tensor)]
    return PixelBatch([row[0] for row in good], [row[1] for row in good], pixels, skipped, len(rows))


def default_workers(n_items: int, batch_size: int) -> int:
    """Decode processes: half of this rank's share of the cores, less one (the main process, which drives the
    GPU, needs cores too: benchmarks/README.md), capped at MAX_WORKERS; 0 (decode in this process) when the input
    is one batch."""
    if n_items <= batch_size:
        return 0
    share = available_cores() // distributed.rank_and_world()[1]
    return max(1, min(share // 2 - 1, MAX_WORKERS, -(-n_items // batch_size)))


def _resolve_workers(workers, n_items: int, batch_size: int) -> int:
    workers = default_workers(n_items, batch_size) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: decode in this process), got {workers!r}")
    return workers


def _sub_batch_size(batch_size: int, workers: int) -> int:
    """Items per worker task: a quarter batch (so the first batch is ready 4x sooner), whole batches without workers."""
    for parts in (4, 2):
        if workers and batch_size % parts == 0:
            return batch_size // parts
    return batch_size


def _merge(parts: list[PixelBatch]) -> tuple[PixelBatch, list[torch.Tensor]]:
    """One batch from consecutive sub-batches: (batch without pixels, the sub-batches' pixel tensors)."""
    batch = PixelBatch([i for p in parts for i in p.indices], [i for p in parts for i in p.ids], None,
                       [s for p in parts for s in p.skipped], sum(p.size for p in parts))
    return batch, [p.pixels for p in parts if p.pixels is not None]


def _host_batches(items, host_preprocess, batch_size: int, workers: int | None,
                  pin: bool) -> Iterator[tuple[PixelBatch, list[torch.Tensor]]]:
    """(batch, its pixel pieces [b_i, 3, H, W] on the host) in input order (positions 0..len-1).

    Workers decode sub-batches (data.images.decode_image per file); `batch_size` items make one batch.
    """
    if isinstance(items, torch.Tensor):
        for start in range(0, items.shape[0], batch_size):
            chunk = items[start:start + batch_size]
            positions = list(range(start, start + chunk.shape[0]))
            yield PixelBatch(positions, [str(i) for i in positions], None, [], chunk.shape[0]), [chunk]
        return
    workers = _resolve_workers(workers, len(items), batch_size)
    sub = _sub_batch_size(batch_size, workers)
    loader = DataLoader(_Decoded(items, host_preprocess), batch_size=sub, shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=pin, worker_init_fn=decode_worker_init if workers else None,
                        prefetch_factor=PREFETCH_BATCHES * (batch_size // sub) if workers else None)
    parts = []
    with main_process_threads(workers):  # workers + this process stay within the cores
        for part in loader:
            parts.append(part)
            if len(parts) * sub == batch_size:
                yield _merge(parts)
                parts = []
        if parts:
            yield _merge(parts)


def iter_pixel_batches(model, items, batch_size: int = 32, workers: int | None = None,
                       decode: str = "cpu") -> Iterator[PixelBatch]:
    """PixelBatches with pixels [B, 3, H, W] on `model.device`, in input order; bad items listed, never raised.

    items: image paths, (id, PIL image) pairs, or a [n, 3, H, W] tensor. On CUDA the pieces decoded by the
    workers are copied from pinned memory into one device tensor on a side stream, so the upload overlaps
    the previous batch's forward; the pixels are ready on the current stream when yielded. Where the preprocess
    ends in ToTensor + Normalize (data/pixel_split.py) the workers hand over uint8 pixels and the float
    conversion runs on the device, with equal results. decode='gpu' (CUDA; image paths): the workers read JPEG
    bytes and nvJPEG decodes them on the GPU (data/gpu_decode.py); other items take the CPU path.
    """
    check_batch_size(batch_size)
    device = torch.device(model.device)
    check_decode(decode, device)
    if decode == "gpu" and not isinstance(items, torch.Tensor) and len(items) and _is_path(items[0]):
        workers = _resolve_workers(workers, len(items), batch_size)
        for indices, ids, pixels, skipped, size in iter_gpu_decoded(items, model.preprocess, batch_size, workers,
                                                                    device):
            yield PixelBatch(indices, ids, pixels, skipped, size)
        return
    cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if cuda else None
    split = None if isinstance(items, torch.Tensor) else split_preprocess(model.preprocess)
    host_preprocess = model.preprocess if split is None else split.on_host
    for batch, pieces in _host_batches(items, host_preprocess, batch_size, workers, pin=cuda):
        if pieces and cuda:
            batch.pixels = _upload(pieces, device, copy_stream)
        elif pieces:
            batch.pixels = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(device)
        if split is not None and batch.pixels is not None:
            batch.pixels = split.finish(batch.pixels)                    # uint8 -> the model's fp32 pixels
        yield batch


def _upload(pieces: list[torch.Tensor], device: torch.device, copy_stream) -> torch.Tensor:
    """Host pieces [b_i, 3, H, W] -> one device tensor [sum b_i, 3, H, W], copied on `copy_stream`."""
    compute = torch.cuda.current_stream(device)
    with torch.cuda.stream(copy_stream):
        if len(pieces) == 1:
            pixels = pieces[0].to(device, non_blocking=True)
        else:
            pixels = torch.empty((sum(p.shape[0] for p in pieces), *pieces[0].shape[1:]), dtype=pieces[0].dtype,
                                 device=device)
            start = 0
            for piece in pieces:
                pixels[start:start + piece.shape[0]].copy_(piece, non_blocking=True)
                start += piece.shape[0]
    compute.wait_stream(copy_stream)
    pixels.record_stream(compute)  # allocated on the copy stream, used on the compute stream
    return pixels

