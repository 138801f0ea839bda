"""torch.distributed helpers for torchrun: init from the environment, shard the data, gather to rank 0.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) everything is a no-op and the
process is rank 0 of a world of 1. Shards are contiguous, so concatenating the gathered shards in
rank order restores the input order.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

# A rank waiting on a collective fails after this many seconds instead of torch's 10 (gloo: 30) minutes:
# a rank that died or raised surfaces quickly. Rank 0 alone scores and writes while the others wait at
# the next collective, so it must exceed the longest such step; set SIGLIP_DOLA_DIST_TIMEOUT to change it.
TIMEOUT_ENV = "SIGLIP_DOLA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0


def collective_timeout() -> timedelta:
    """The process-group timeout: $SIGLIP_DOLA_DIST_TIMEOUT seconds (default 120)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    return timedelta(seconds=seconds)


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
    _import_group_defaults()
    if backend == "nccl":
        torch.cuda.set_device(local_device())  # object collectives on nccl use the current device
    dist.init_process_group(backend=backend, timeout=collective_timeout())
    return True


def _import_group_defaults() -> None:
    """Import torch.distributed.nn.functional before the process group exists.

    Its collectives bind ``group=group.WORLD`` as a default argument when the module is first imported. Imported
    after init_process_group (lazily: torchvision imports torch._dynamo, which imports it), ten functions hold the
    default group in their ``__defaults__``, so destroy_process_group cannot free it: its gloo worker threads outlive
    the session, and one still releasing the last collective's tensors when the interpreter shuts down takes the
    GIL, is ended by CPython inside a noexcept destructor, and aborts the rank ("terminate called without an active
    exception"). Imported first, the default is None.
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # a build without it cannot leak through it
        pass


@contextmanager
def distributed_session(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """Context: init from the environment if needed, yield (rank, world); every rank leaves together.

    The exit barrier runs whoever created the group: a command whose rank 0 writes a file (a
    calibration, an index) returns on no rank before it is written, so the next step on any rank can
    read it. The group is destroyed on exit only if this call created it.
    """
    created = init_from_env(backend)
    try:
        yield rank_and_world()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # success: rank 0's writes are done before anyone moves on
    finally:
        if created and dist.is_initialized():
            _let_collectives_release()
            dist.destroy_process_group()


def _let_collectives_release() -> None:
    """Give gloo's worker threads the GIL before the group is destroyed, on torch without ProcessGroup.shutdown.

    A worker thread frees a finished collective (and the tensors Python already dropped, which needs the GIL)
    just after the caller saw it complete. Torch whose ProcessGroup has no shutdown() (2.4.1, the lower bound)
    destroys a gloo group by joining those threads with the GIL held: a thread still waiting for the GIL then
    never ends (seen: a rank hung in ~ProcessGroupGloo). Torch with shutdown() needs no wait.
    """
    if not hasattr(torch._C._distributed_c10d.ProcessGroup, "shutdown"):
        time.sleep(0.2)  # the GIL is free: a waiting worker frees its collective in microseconds


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
