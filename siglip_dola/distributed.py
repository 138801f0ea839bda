"""torch.distributed helpers for torchrun: init from the environment, shard the data, gather to rank 0.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) everything is a no-op and the
process is rank 0 of a world of 1. Shards are contiguous, so concatenating the gathered shards in
rank order restores the input order.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and always without torch.distributed): the process that writes files and prints."""
    return rank_and_world()[0] == 0


def local_device() -> torch.device:
    """The device this process should put its model on: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's variables; returns True if this call did it.

    backend defaults to nccl when CUDA is available, else gloo. A no-op (False) without WORLD_SIZE > 1
    or when a group already exists.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be one of None, 'nccl', 'gloo', got {backend!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_device())  # object collectives on nccl use the current device
    dist.init_process_group(backend=backend)
    return True


@contextmanager
def distributed_session(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """Context: init from the environment if needed, yield (rank, world), destroy the group we made on exit."""
    created = init_from_env(backend)
    try:
        yield rank_and_world()
    finally:
        if created and dist.is_initialized():
            try:
                dist.barrier()  # leave together: a rank re-initialising while another still works can hang
            finally:
                dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n items; sizes differ by at most one, earlier ranks larger."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..world-1 and world >= 1, got rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence, rank: int, world: int) -> Sequence:
    """Rank's contiguous slice of items (a sequence supporting slicing)."""
    start, stop = shard_bounds(len(items), rank, world)
    return items[start:stop]


def gather_to_rank0(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the other ranks; [obj] without distributed.

    Objects are pickled by torch.distributed (keep tensors on CPU); fine for embeddings of a few
    thousand images.
    """
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_rank0(obj):
    """Rank 0's obj on every rank (used to share results or errors); obj itself without distributed."""
    rank, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port for torchrun's --master-port, below Linux's ephemeral range (32768+).

    A TCPStore port inside the ephemeral range can be taken by an outgoing connection between the
    check and the bind, and connecting to it then hangs; ports below it are only ever ours.
    """
    import random
    import socket

    for port in random.sample(range(low, high), min(200, high - low)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in {low}..{high - 1}")
