"""Host time inside named library functions of one call, from cProfile (breakdown.py, eval_throughput.py).

cProfile's cumulative time per function, summed over the calls made: nested stages hold their callees, and the
profiler's own cost inflates Python-heavy stages, so read the figures as shares of ``all`` (every function's own
time), not as wall time.
"""
from __future__ import annotations

import cProfile
import pstats
from typing import Callable


def stage_seconds(call: Callable[[], object], names: tuple[str, ...], repeats: int = 1) -> dict[str, float]:
    """{"module.function": seconds per repeat} for siglip_dola functions named in `names`, plus "torch ops" (time in
    torch's C functions) and "all", over `repeats` calls of `call()`."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        for _ in range(repeats):
            call()
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler).stats   # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    seconds: dict[str, float] = {}
    for (file, _, name), (_, _, tottime, cumtime, _) in stats.items():
        if "siglip_dola" in file and name in names:
            label = f"{file.rsplit('siglip_dola/', 1)[-1].removesuffix('.py').replace('/', '.')}.{name}"
            seconds[label] = seconds.get(label, 0.0) + cumtime / repeats
        elif file == "~" and "torch" in name:
            seconds["torch ops"] = seconds.get("torch ops", 0.0) + tottime / repeats
    seconds["all"] = sum(v[2] for v in stats.values()) / repeats
    return seconds
