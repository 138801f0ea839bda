"""Fast-path switches, in one place (as timm/layers/config.py): read from the environment once, at import.

    from siglip_dola import config
    config.use_triton_scoring()                 # True where the Triton scoring kernel may run
    config.set_fused_pooling(False)             # the readout pools every layer in PyTorch from now on
    with config.override(triton_scoring=False, num_warps=4):   # tests and benchmarks: restored on exit
        ...

Options (environment override: ``SIGLIP_DOLA_<NAME>``, e.g. ``SIGLIP_DOLA_FUSED_POOLING=0``):
- ``triton_scoring``: ``scoring.score`` runs its post-matmul math as one Triton kernel where usable.
- ``fused_pooling``: the readout pools captured layers with the Triton kernel (CUDA, half precision).
- ``entry_norms``: the fused readout pools layer j from block j+1's own first LayerNorm where exact.
- ``target_programs``, ``num_warps``, ``block_t``, ``num_stages``: the pooling kernel's launch (0 programs: one per SM).
- ``stacked_max_batch``, ``stacked_max_batch_graphed``, ``stacked_on_cpu``: at batch <= stacked_max_batch (0: never;
  while a CUDA graph is captured: stacked_max_batch_graphed) the fused readout pools all layers in ONE launch after
  the forward ("fused-stacked"), on CUDA only unless stacked_on_cpu (the interpreter tests).
- ``stacked_tuning`` (opt-in): while ``stacked_max_batch`` is not set (here or in the environment), an eager CUDA call at a
  batch of 2..16 takes whichever of stacked and per-layer pooling a one-time measurement on this GPU found faster
  (readout/stacking_tuner.py, cached per device name under the user's cache folder).

``triton_interpreted()`` is ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, which the tests use), read here once.
Unknown option names, and values of the wrong type, raise ValueError.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_DEFAULTS: dict[str, bool | int] = {
    "triton_scoring": True,
    "fused_pooling": True,
    "entry_norms": True,
    "target_programs": 0,   # 0: the device's number of SMs (one 8-warp program fills an SM)
    "num_warps": 8,         # fastest of 4/8/16 (benchmarks/README.md)
    "block_t": 16,          # tokens per inner step: the smallest tl.dot tile
    "num_stages": 3,        # software-pipelining depth of the token loads (Triton's default)
    # small batches: one launch of (B, <=8) programs per layer leaves most SMs idle and costs host time per layer
    # in eager; one stacked launch of (J * B, S) programs after the forward does not, but copies the J held outputs
    # once. Eager it won at batch 1 and 8; replayed from a CUDA graph (no host cost) only at batch 1: at batch 8 the
    # copy cost more than the idle SMs (benchmarks/README.md, product.py)
    "stacked_max_batch": 8,
    "stacked_max_batch_graphed": 1,   # the limit while a CUDA graph is being captured
    "stacked_on_cpu": False,   # CUDA only by default: the interpreter tests of the per-layer paths keep their paths
    # stacked_max_batch=8 came from an H200 and lost at batch 8 on an H100: the tuner measures on the GPU in hand,
    # but is opt-in (SIGLIP_DOLA_STACKED_TUNING=1) until product.py has timed it on a GPU (benchmarks/README.md)
    "stacked_tuning": False,
}
_MINIMUM = {"target_programs": 0, "stacked_max_batch": 0, "stacked_max_batch_graphed": 0}   # the other int knobs are >= 1
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(name: str, value) -> bool | int:
    """A checked value for option ``name`` (bools for switches, ints >= 0 for the launch knobs)."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown siglip_dola.config option {name!r}; valid options: {sorted(_DEFAULTS)}")
    if isinstance(value, str):   # from the environment
        text = value.strip().lower()
        if isinstance(_DEFAULTS[name], bool):
            if text not in _TRUE + _FALSE:
                raise ValueError(f"SIGLIP_DOLA_{name.upper()} must be one of {_TRUE + _FALSE}, got {value!r}")
            return text in _TRUE
        value = int(text) if text.isdigit() else value
    if isinstance(_DEFAULTS[name], bool):
        if not isinstance(value, bool):
            raise ValueError(f"config option {name!r} must be True or False, got {value!r}")
        return value
    minimum = _MINIMUM.get(name, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config option {name!r} must be an int >= {minimum}, got {value!r}")
    if name in ("block_t", "num_warps") and value & (value - 1):   # tl.arange / warps: powers of two
        raise ValueError(f"config option {name!r} must be a power of two{' >= 16' if name == 'block_t' else ''}, "
                         f"got {value!r}")
    if name == "block_t" and value < 16:                             # the smallest tl.dot tile
        raise ValueError(f"config option 'block_t' must be a power of two >= 16, got {value!r}")
    return value


def _from_environment() -> dict[str, bool | int]:
    values = dict(_DEFAULTS)
    for name in _DEFAULTS:
        raw = os.environ.get(f"SIGLIP_DOLA_{name.upper()}")
        if raw is not None:
            values[name] = _parse(name, raw)
            _SET.add(name)
    return values


_SET: set[str] = set()   # options given a value (environment, set, override): not the built-in default
_VALUES = _from_environment()
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_interpreted() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 at import): kernels then run on CPU tensors."""
    return _INTERPRETED


def get(name: str) -> bool | int:
    """The current value of option ``name``."""
    _parse(name, _DEFAULTS.get(name))   # raises for unknown names
    return _VALUES[name]


def set(**options) -> None:  # noqa: A001  (config.set mirrors timm's set_* style, for several options at once)
    """Set options by name, e.g. ``config.set(num_warps=4)``; all are checked before any is set."""
    checked = {name: _parse(name, value) for name, value in options.items()}
    _VALUES.update(checked)
    _SET.update(checked)


def is_set(name: str) -> bool:
    """True when option ``name`` was given a value (environment, set, override) rather than left at its default."""
    get(name)
    return name in _SET


@contextlib.contextmanager
def override(**options) -> Iterator[None]:
    """Set ``options`` inside the ``with`` block and restore the previous values on exit (even after an error)."""
    saved, was_set = {name: get(name) for name in options}, _SET & options.keys()
    set(**options)
    try:
        yield
    finally:
        _VALUES.update(saved)
        _SET.difference_update(options.keys() - was_set)


def use_triton_scoring() -> bool:
    return bool(_VALUES["triton_scoring"])


def set_triton_scoring(enable: bool = True) -> None:
    set(triton_scoring=enable)


def use_fused_pooling() -> bool:
    return bool(_VALUES["fused_pooling"])


def set_fused_pooling(enable: bool = True) -> None:
    set(fused_pooling=enable)


def use_entry_norms() -> bool:
    return bool(_VALUES["entry_norms"])


def set_entry_norms(enable: bool = True) -> None:
    set(entry_norms=enable)


def pooling_launch() -> dict[str, int | bool]:
    """The pooling kernel's launch knobs: {target_programs, num_warps, block_t, num_stages, stacked_max_batch,
    stacked_max_batch_graphed} (ints) and stacked_on_cpu (bool)."""
    names = ("target_programs", "num_warps", "block_t", "num_stages", "stacked_max_batch", "stacked_max_batch_graphed",
             "stacked_on_cpu")
    return {name: _VALUES[name] if name == "stacked_on_cpu" else int(_VALUES[name]) for name in names}
