"""Stacked or per-layer pooling at small eager batches: measured once on the GPU in hand, cached by its name.

Why: which of the two wins at batch 2..16 depends on the GPU (launch latency against copy bandwidth) and on the
model: ``stacked_max_batch=8``, chosen on an H200, lost to per-layer pooling at batch 8 on an H100 (issue #28).
So the first eager call of a (GPU, model shape, dtype, batch, layer count) runs the readout both ways a few times,
interleaved, each call timed as a user sees it (synchronised wall time), and the faster is kept: in memory, and in
``<user cache>/siglip_dola/stacking.json`` (``$SIGLIP_DOLA_CACHE_DIR`` overrides the folder), written atomically,
keyed by the device name, so later processes on the same kind of GPU skip the measurement.

Only while ``config.stacked_tuning`` is on and ``stacked_max_batch`` was not set (environment, ``config.set`` or
``config.override``): an explicit setting always wins. CUDA graph captures keep ``stacked_max_batch_graphed``.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from siglip_dola import config
from siglip_dola.io import write_json_atomic
from siglip_dola.readout.call_state import stream_capturing

MIN_BATCH, MAX_BATCH = 2, 16   # batch 1 always stacks (one launch per layer leaves the SMs idle); past 16 never
ROUNDS = 3                     # timed calls per variant (after one warm-up each), interleaved; the minimum is kept
_CHOICES: dict[str, bool] = {}   # key -> stack (this process)


def cache_file() -> Path:
    """Where the measured choices are kept (one JSON object: key -> record)."""
    root = os.environ.get("SIGLIP_DOLA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "siglip_dola")
    return Path(root) / "stacking.json"


def _tunable(images: torch.Tensor) -> bool:
    return images.is_cuda   # stacking runs on CUDA only (config stacked_on_cpu is for the interpreter tests)


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def tuning_key(device: torch.device, shape: tuple, dtype, num_layers: int, signature: tuple) -> str:
    """The cache key: device name, torch version, the model's signature, input shape and dtype, layers read."""
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (f"{_device_name(device)}|torch {torch.__version__}|{'/'.join(map(str, signature))}|"
            f"input {list(shape)} {dtype} autocast {autocast}|layers {num_layers}")


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):   # none yet, unreadable or corrupt: measure again (and rewrite it)
        return {}
    return data if isinstance(data, dict) else {}


def cached_choice(key: str) -> bool | None:
    """True (stack) / False (per layer) if measured before, in this process or in the cache file; else None."""
    if key not in _CHOICES:
        record = _read().get(key)
        if isinstance(record, dict) and isinstance(record.get("stack"), bool):
            _CHOICES[key] = record["stack"]
    return _CHOICES.get(key)


def remember(key: str, record: dict) -> None:
    """Keep a measured choice in memory and in the cache file (an unwritable cache folder keeps it in memory)."""
    _CHOICES[key] = bool(record["stack"])
    data = _read()
    data[key] = record
    try:
        write_json_atomic(cache_file(), data)
    except OSError:
        pass


def measure(run: Callable[[int], object], batch: int, device: torch.device) -> dict:
    """{"stack": bool, "stacked_ms", "per_layer_ms"}: run(limit) with limit = batch (stack) and 0 (per layer)."""
    times: dict[int, list[float]] = {batch: [], 0: []}
    for limit in times:
        run(limit)   # warm-up: compiles, caches
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    for _ in range(ROUNDS):
        for limit in times:
            sync(device)
            start = time.perf_counter()
            run(limit)
            sync(device)
            times[limit].append((time.perf_counter() - start) * 1e3)
    stacked, per_layer = min(times[batch]), min(times[0])
    return {"stack": stacked < per_layer, "stacked_ms": stacked, "per_layer_ms": per_layer}


def stacked_limit(images: torch.Tensor, layers: list[int], signature: tuple,
                  run: Callable[[int], object]) -> int | None:
    """``stacked_max_batch`` for this call (the batch: stack; 0: per layer), or None to leave the config alone.

    ``run(limit)`` makes the call with that limit (used to measure when no choice is known yet)."""
    batch = images.shape[0]
    if not (MIN_BATCH <= batch <= MAX_BATCH and layers and _tunable(images) and config.get("stacked_tuning")
            and not config.is_set("stacked_max_batch") and not stream_capturing(images.device)):
        return None
    key = tuning_key(images.device, tuple(images.shape), images.dtype, len(layers), signature)
    stack = cached_choice(key)
    if stack is None:
        def timed_run(limit: int):
            with config.override(stacked_max_batch=limit):
                return run(limit)
        record = measure(timed_run, batch, images.device)
        remember(key, {**record, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        stack = record["stack"]
    return batch if stack else 0
