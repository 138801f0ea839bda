"""The one image loop and the one text loop: classify, rerank, calibrate, eval, index build/add and caption
search all embed through here.

Images: files are decoded by `data.images.decode_image` (a bad file is reported, never raised) in
DataLoader worker processes; batches arrive in pinned memory, are uploaded on a side CUDA stream, and each
batch's results are copied back without blocking while the next batch computes. So decoding, both copies
and the forward overlap, and the GPU waits on the host only when decoding is slower than the forward.
Under torchrun each rank embeds a contiguous shard and rank 0 gathers the shards in input order.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from siglip_dola import distributed
from siglip_dola.data.images import decode_image
from siglip_dola.loading import autocast

MAX_WORKERS = 16       # decode processes per rank; past this the host copies, not decoding, limit
PREFETCH_BATCHES = 2   # batches each worker decodes ahead (each in shared memory: B x 3 x H x W fp32)


@dataclass
class Embeddings:
    """Raw (not normalised) embeddings of the images that decoded, in input order.

    z_final [n, D] fp32 cpu (the model's own image embedding), z_layers [J, n, D] fp32 cpu (layer
    `layers[j]` read through the final norm + head), ids [n] (paths as str, or the given ids),
    indices [n] (positions of those items in the input), skipped [(id, error)] for items that failed.
    """
    z_final: torch.Tensor
    z_layers: torch.Tensor
    layers: list[int]
    ids: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)


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


@dataclass
class EmbeddedBatch:
    """One batch's embeddings: z_final [B, D], z_layers [J, B, D] (fp32 cpu; None when every item failed)."""
    indices: list[int]
    ids: list[str]
    z_final: torch.Tensor | None
    z_layers: torch.Tensor | None
    skipped: list[tuple[str, str]]
    size: int


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


def _check_batch_size(batch_size) -> None:
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
    """Decode processes: half of this rank's share of the cores, less one (on an H200 host with 16 cores,
    7 workers fed ViT-L/16-384 faster than 15: the main process, which drives the GPU, needs cores too),
    capped at MAX_WORKERS; 0 (decode in this process) when the input is one batch."""
    if n_items <= batch_size:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cores // distributed.rank_and_world()[1]
    return max(1, min(share // 2 - 1, MAX_WORKERS, -(-n_items // batch_size)))


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


def _host_batches(items, preprocess, batch_size: int, workers: int | None,
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
    workers = default_workers(len(items), batch_size) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: decode in this process), got {workers!r}")
    sub = _sub_batch_size(batch_size, workers)
    loader = DataLoader(_Decoded(items, preprocess), batch_size=sub, shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=pin,
                        prefetch_factor=PREFETCH_BATCHES * (batch_size // sub) if workers else None)
    parts = []
    for part in loader:
        parts.append(part)
        if len(parts) * sub == batch_size:
            yield _merge(parts)
            parts = []
    if parts:
        yield _merge(parts)


def iter_pixel_batches(model, items, batch_size: int = 32, workers: int | None = None) -> Iterator[PixelBatch]:
    """PixelBatches with pixels [B, 3, H, W] on `model.device`, in input order; bad items listed, never raised.

    items: image paths, (id, PIL image) pairs, or a [n, 3, H, W] tensor. On CUDA the pieces decoded by the
    workers are copied from pinned memory into one device tensor on a side stream, so the upload overlaps
    the previous batch's forward; the pixels are ready on the current stream when yielded.
    """
    _check_batch_size(batch_size)
    device = torch.device(model.device)
    cuda = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if cuda else None
    for batch, pieces in _host_batches(items, model.preprocess, batch_size, workers, pin=cuda):
        if pieces and cuda:
            batch.pixels = _upload(pieces, device, copy_stream)
        elif pieces:
            batch.pixels = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(device)
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


def _launch(readout, model, pixels: torch.Tensor, layers: list[int]) -> tuple:
    """One readout call, queued: pixels [B, 3, H, W] -> (z_final [B, D], z_layers [J, B, D]) fp32 on the device."""
    with torch.inference_mode(), autocast(torch.device(model.device), model.dtype):
        z_final, z_layers = readout(pixels, layers=layers)
    return z_final.float(), z_layers.float()


def _start_readback(tensors: tuple) -> tuple[tuple, torch.cuda.Event | None]:
    """Queue device -> host copies (into pinned memory on CUDA); the event marks their completion."""
    if not tensors[0].is_cuda:
        return tensors, None
    host = tuple(t.to("cpu", non_blocking=True) for t in tensors)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _finish_readback(host: tuple, done, copy: bool) -> tuple:
    """Wait for the copies; clone out of the pinned staging memory (reused for later batches) when `copy`."""
    if done is None:
        return host
    done.synchronize()
    return tuple(t.clone() for t in host) if copy else host


def iter_embedded(model, items, layers: Sequence[int], batch_size: int = 32, workers: int | None = None,
                  readout=None, copy: bool = True) -> Iterator[EmbeddedBatch]:
    """EmbeddedBatches (z_final [B, D], z_layers [J, B, D] fp32 cpu) in input order, one readout call per batch.

    The next batch is uploaded and queued before this one's results are read back, so the device never
    waits on the host between batches. `readout` (default model.readout) may be e.g. a CUDA-graph cache.
    copy=False yields the pinned staging tensors themselves: copy them out before the next batch.
    """
    readout = model.readout if readout is None else readout
    layers = [int(j) for j in layers]
    pending = None  # (batch, host tensors, event) read back after the next batch is queued
    for batch in iter_pixel_batches(model, items, batch_size, workers):
        queued = None
        if batch.pixels is not None:
            queued = (batch, *_start_readback(_launch(readout, model, batch.pixels, layers)))
        else:
            queued = (batch, None, None)
        if pending is not None:
            yield _embedded(*pending, copy)
        pending = queued
    if pending is not None:
        yield _embedded(*pending, copy)


def _embedded(batch: PixelBatch, host, done, copy: bool) -> EmbeddedBatch:
    z_final, z_layers = _finish_readback(host, done, copy) if host is not None else (None, None)
    return EmbeddedBatch(batch.indices, batch.ids, z_final, z_layers, batch.skipped, batch.size)


def _embed_shard(model, items: Sequence, offset: int, layers: list[int], batch_size: int, progress,
                 workers: int | None, readout) -> Embeddings:
    """Embeddings of one contiguous shard (input positions offset..offset+len-1), written in place."""
    dim, result, count = model.readout.embed_dim, Embeddings(None, None, list(layers), []), 0
    z_final, z_layers = torch.empty(len(items), dim), torch.empty(len(layers), len(items), dim)  # (n, D), (J, n, D)
    # a caller's bar (an index build's one bar over all chunks) is updated, not closed
    given = hasattr(progress, "update")
    with (contextlib.nullcontext(progress) if given else
          tqdm(total=len(items), disable=not progress, desc="embedding", unit="img")) as bar:
        for batch in iter_embedded(model, items, layers, batch_size, workers, readout, copy=False):
            result.skipped.extend(batch.skipped)
            if batch.z_final is not None:
                size = batch.z_final.shape[0]
                z_final[count:count + size] = batch.z_final
                z_layers[:, count:count + size] = batch.z_layers
                count += size
                result.ids.extend(batch.ids)
                result.indices.extend(offset + i for i in batch.indices)
            bar.update(batch.size)
    kept = count == len(items)  # nothing skipped: the buffers are the result, no copy
    result.z_final = z_final if kept else z_final[:count].clone()
    result.z_layers = z_layers if kept else z_layers[:, :count].contiguous()
    return result


def concat_embeddings(parts: list[Embeddings]) -> Embeddings:
    """Concatenate shards (in input order) into one Embeddings."""
    return Embeddings(
        z_final=torch.cat([p.z_final for p in parts]),
        z_layers=torch.cat([p.z_layers for p in parts], dim=1),
        layers=list(parts[0].layers),
        ids=[i for p in parts for i in p.ids],
        skipped=[s for p in parts for s in p.skipped],
        indices=[i for p in parts for i in p.indices],
    )


def embed_images(model, items: Iterable, layers: Sequence[int], batch_size: int = 32, progress=True,
                 workers: int | None = None, readout=None) -> Embeddings | None:
    """Embed image paths or (id, PIL image) pairs: z_final [n, D], z_layers [J, n, D] (fp32, cpu).

    One readout call per batch gives the final and every requested layer. Bad files are skipped and
    listed in `skipped`. workers: decode processes (None: the spare cores; 0: in this process).
    Under torch.distributed each rank embeds a contiguous shard; rank 0 returns everything in input
    order and the other ranks return None.
    """
    _check_batch_size(batch_size)
    items = check_items(items)
    layers = [int(j) for j in layers]
    rank, world = distributed.rank_and_world()
    start, stop = distributed.shard_bounds(len(items), rank, world)
    local = _embed_shard(model, items[start:stop], start, layers, batch_size, progress if rank == 0 else False,
                         workers, readout)
    parts = distributed.gather_to_rank0(local)
    return None if parts is None else concat_embeddings(parts)


def embed_texts(model, texts: Sequence[str], batch_size: int = 256, needed_for: str = "text embeddings") -> torch.Tensor:
    """Raw (not normalised) text embeddings [T, D] fp32 cpu, `batch_size` texts per encoder call.

    ValueError naming `needed_for` when the model has no text tower.
    """
    if model.encode_text is None:
        raise ValueError(f"model {model.model_id!r} has no text tower: {needed_for} need one")
    _check_batch_size(batch_size)
    texts = list(texts)
    if not texts:
        return torch.zeros(0, model.readout.embed_dim)
    with torch.inference_mode():
        return torch.cat([model.encode_text(texts[i:i + batch_size]).float().cpu()
                          for i in range(0, len(texts), batch_size)])
