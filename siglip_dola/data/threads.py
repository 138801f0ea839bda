"""CPU threads while images decode in worker processes: workers and the main process must not oversubscribe
the cores (under load, `eval` with torch's default threads ran 2.4-11x slower than with one).

As the DataLoader's own guidance has it, each decode worker runs torch with one thread (`worker_init_fn`);
while W workers decode, the main process (which runs the model on CPU, or feeds the GPU) keeps the
remaining cores: torch.get_num_threads() capped at cores - W, at least 1, and restored afterwards.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: one torch thread per decode process."""
    torch.set_num_threads(1)


@contextmanager
def main_process_threads(workers: int) -> Iterator[int]:
    """Cap this process's torch threads at cores - `workers` (>= 1) while they decode; yield the cap."""
    before = torch.get_num_threads()
    cap = before if workers <= 0 else max(1, min(before, available_cores() - workers))
    torch.set_num_threads(cap)
    try:
        yield cap
    finally:
        torch.set_num_threads(before)
