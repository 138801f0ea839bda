"""One pass over a dataset or image list: final + all requested layers' embeddings in one readout call per batch.

Under torchrun each rank embeds a contiguous shard and rank 0 gathers the shards in input order.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from siglip_dola import distributed
from siglip_dola.data.images import iter_image_batches
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
class _PixelBatch:
    indices: list[int]            # positions in the full input
    ids: list[str]
    pixels: torch.Tensor | None   # (B, 3, H, W)
    skipped: list[tuple[str, str]]
    size: int                     # items consumed (good + skipped), for the progress bar


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike))


def _check_items(items) -> Sequence:
    """items as an indexable sequence of all paths or all (id, PIL image) pairs."""
    if isinstance(items, (str, os.PathLike)):
        raise TypeError("items must be a sequence of image paths or (id, PIL image) pairs, not a single path")
    if not isinstance(items, Sequence):
        items = list(items)
    if len(items) and not (_is_path(items[0]) or (isinstance(items[0], tuple) and len(items[0]) == 2)):
        raise TypeError(f"items must hold image paths or (id, PIL image) pairs, got {type(items[0]).__name__}")
    return items


def _path_batches(paths: Sequence, offset: int, preprocess, batch_size: int) -> Iterator[_PixelBatch]:
    """Decode paths with images.iter_image_batches; map the kept paths back to input positions."""
    paths = [Path(p) for p in paths]
    for chunk_start, batch in zip(range(0, len(paths), batch_size),
                                  iter_image_batches(paths, preprocess, batch_size)):
        chunk = paths[chunk_start:chunk_start + batch_size]
        kept, cursor = [], 0
        for position, path in enumerate(chunk):  # kept paths are an in-order subsequence of the chunk
            if cursor < len(batch.paths) and batch.paths[cursor] == path:
                kept.append(offset + chunk_start + position)
                cursor += 1
        assert cursor == len(batch.paths), "iter_image_batches returned paths out of order"
        yield _PixelBatch(kept, [str(p) for p in batch.paths], batch.pixels,
                          [(str(p), err) for p, err in batch.skipped], len(chunk))


def _preprocess_one(image, preprocess) -> torch.Tensor | str:
    try:
        return preprocess(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - one bad image must not end the pass
        return f"{type(err).__name__}: {err}"


def _pair_batches(pairs: Sequence, offset: int, preprocess, batch_size: int) -> Iterator[_PixelBatch]:
    """Preprocess (id, PIL image) pairs batch by batch; images that fail are reported, not raised."""
    for chunk_start in range(0, len(pairs), batch_size):
        chunk = pairs[chunk_start:chunk_start + batch_size]
        indices, ids, tensors, skipped = [], [], [], []
        for position, (item_id, image) in enumerate(chunk):
            result = _preprocess_one(image, preprocess)
            if isinstance(result, str):
                skipped.append((str(item_id), result))
                continue
            indices.append(offset + chunk_start + position)
            ids.append(str(item_id))
            tensors.append(result)
        pixels = torch.stack(tensors) if tensors else None  # (B, 3, H, W)
        yield _PixelBatch(indices, ids, pixels, skipped, len(chunk))


def _readout_batch(model, pixels: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One readout call: pixels [B,3,H,W] -> (z_final [B,D], z_layers [J,B,D]) fp32 on cpu."""
    with torch.inference_mode(), autocast(model.device, model.dtype):
        z_final, z_layers = model.readout(pixels.to(model.device), layers=layers)
    return z_final.float().cpu(), z_layers.float().cpu()


def _embed_shard(model, items: Sequence, offset: int, layers: list[int], batch_size: int,
                 progress: bool) -> Embeddings:
    """Embeddings of one contiguous shard items (input positions offset..offset+len-1)."""
    batches = (_path_batches if items and _is_path(items[0]) else _pair_batches)(
        items, offset, model.preprocess, batch_size)
    finals, stacks, result = [], [], Embeddings(None, None, list(layers), [])
    # a caller's bar (an index build's one bar over all chunks) is updated, not closed
    given = hasattr(progress, "update")
    with (contextlib.nullcontext(progress) if given else
          tqdm(total=len(items), disable=not progress, desc="embedding", unit="img")) as bar:
        for batch in batches:
            result.skipped.extend(batch.skipped)
            if batch.pixels is not None:
                z_final, z_layers = _readout_batch(model, batch.pixels, list(layers))
                finals.append(z_final)
                stacks.append(z_layers)
                result.ids.extend(batch.ids)
                result.indices.extend(batch.indices)
            bar.update(batch.size)
    dim = model.readout.embed_dim
    result.z_final = torch.cat(finals) if finals else torch.zeros(0, dim)
    result.z_layers = torch.cat(stacks, dim=1) if stacks else torch.zeros(len(layers), 0, dim)
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


def embed_images(model, items: Iterable, layers: Sequence[int], batch_size: int = 32,
                 progress=True) -> Embeddings | None:
    """Embed image paths or (id, PIL image) pairs: z_final [n, D], z_layers [J, n, D] (fp32, cpu).

    One model.readout call per batch gives the final and every requested layer. Bad files are skipped
    and listed in `skipped`. Under torch.distributed each rank embeds a contiguous shard; rank 0
    returns everything in input order and the other ranks return None.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    items = _check_items(items)
    layers = [int(j) for j in layers]
    rank, world = distributed.rank_and_world()
    start, stop = distributed.shard_bounds(len(items), rank, world)
    local = _embed_shard(model, items[start:stop], start, layers, batch_size, progress if rank == 0 else False)
    parts = distributed.gather_to_rank0(local)
    return None if parts is None else concat_embeddings(parts)
