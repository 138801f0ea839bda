"""The one image loop: classify, rerank, calibrate, eval, index build/add and caption search all embed
images through here.

embedding/pixel_batches.py decodes them in DataLoader workers and uploads each batch on a side
CUDA stream; here each batch's readout is queued and its results are copied back without blocking while
the next batch computes. So decoding, both copies and the forward overlap, and the GPU waits on the host
only when decoding is slower than the forward. Under torchrun each rank embeds a contiguous shard and
rank 0 gathers the shards in input order.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from siglip_dola import distributed
from siglip_dola.data.gpu_decode import check_decode
from siglip_dola.embedding.pixel_batches import PixelBatch, check_batch_size, check_items, iter_pixel_batches
from siglip_dola.loading import autocast


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
class EmbeddedBatch:
    """One batch's embeddings: z_final [B, D], z_layers [J, B, D] (fp32 cpu; None when every item failed)."""
    indices: list[int]
    ids: list[str]
    z_final: torch.Tensor | None
    z_layers: torch.Tensor | None
    skipped: list[tuple[str, str]]
    size: int


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
                  readout=None, copy: bool = True, decode: str = "cpu") -> Iterator[EmbeddedBatch]:
    """EmbeddedBatches (z_final [B, D], z_layers [J, B, D] fp32 cpu) in input order, one readout call per batch.

    The next batch is uploaded and queued before this one's results are read back, so the device never
    waits on the host between batches. `readout` (default model.readout) may be e.g. a CUDA-graph cache.
    copy=False yields the pinned staging tensors themselves: copy them out before the next batch.
    """
    readout = model.readout if readout is None else readout
    layers = model.readout.check_layers(layers)   # checked once here (or where settings were resolved), not per batch
    pending = None  # (batch, host tensors, event) read back after the next batch is queued
    for batch in iter_pixel_batches(model, items, batch_size, workers, decode):
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
                 workers: int | None, readout, decode: str = "cpu") -> Embeddings:
    """Embeddings of one contiguous shard (input positions offset..offset+len-1), written in place."""
    dim, result, count = model.readout.embed_dim, Embeddings(None, None, list(layers), []), 0
    z_final, z_layers = torch.empty(len(items), dim), torch.empty(len(layers), len(items), dim)  # (n, D), (J, n, D)
    # a caller's bar (an index build's one bar over all chunks) is updated, not closed
    given = hasattr(progress, "update")
    with (contextlib.nullcontext(progress) if given else
          tqdm(total=len(items), disable=not progress, desc="embedding", unit="img")) as bar:
        for batch in iter_embedded(model, items, layers, batch_size, workers, readout, copy=False, decode=decode):
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
                 workers: int | None = None, readout=None, shard: bool = True,
                 decode: str = "cpu") -> Embeddings | None:
    """Embed image paths or (id, PIL image) pairs: z_final [n, D], z_layers [J, n, D] (fp32, cpu).

    One readout call per batch gives the final and every requested layer. Bad files are skipped and
    listed in `skipped`. workers: decode processes (None: the spare cores; 0: in this process). decode: 'cpu'
    (PIL in the workers) or 'gpu' (nvJPEG on the model's CUDA device, data/gpu_decode.py).
    Under torch.distributed each rank embeds a contiguous shard; rank 0 returns everything in input
    order and the other ranks return None. shard=False: this process embeds every item and returns them
    (an index build gives each rank its own chunks).
    """
    check_batch_size(batch_size)
    check_decode(decode, model.device)
    items = check_items(items)
    layers = model.readout.check_layers(layers)   # before any image is decoded
    rank, world = distributed.rank_and_world() if shard else (0, 1)
    start, stop = distributed.shard_bounds(len(items), rank, world)
    local = _embed_shard(model, items[start:stop], start, layers, batch_size, progress if rank == 0 else False,
                         workers, readout, decode)
    parts = distributed.gather_to_rank0(local) if shard else [local]
    return None if parts is None else concat_embeddings(parts)

