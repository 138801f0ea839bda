"""The DoLa modes: ONE table, name -> layer policy, the math that picks the premature layer, the kernel's code.

A new mode is one entry of :data:`MODES` plus its ``choose`` function here and its test; every other module
reads the table (the CLI's ``--mode`` choices, the layer policy, calibration's grid, the viewer's modes, the
scoring paths). ``kernel_code`` is the ``MODE`` branch of scoring/kernel.py's Triton kernel; a mode without
one (None) always takes the eager path, which is the reference.

    choose(position, jsd_table, static_position) -> position [...] int64 of q_M in the candidate layers,
                                                     or None: no contrast, p_hat = q_N (plain SigLIP)
    position: argmax_j JSD(q_N || q_j) [...] (ties: the earliest listed); jsd_table [J, ...]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:   # no torch import at run time: the CLI reads this table for its --mode choices
    import torch


@dataclass(frozen=True)
class Mode:
    name: str
    choose: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor | None]  # see the module docstring
    kernel_code: int | None      # the Triton kernel's MODE branch; None: eager only
    fixed_layer: bool            # contrasts one given layer: takes static_layer (default: the middle candidate)
    reads_by_default: bool       # reads candidate layers when no layers / bucket are given
    help: str                    # one line for --help and docs


def _most_distant(position: torch.Tensor, jsd_table: torch.Tensor, static_position: int) -> torch.Tensor:
    return position  # per input, M = argmax_j JSD(q_N || q_j)


def _fixed(position: torch.Tensor, jsd_table: torch.Tensor, static_position: int) -> torch.Tensor:
    return position.new_full(position.shape, static_position)  # M = static_layer for every input


def _no_contrast(position: torch.Tensor, jsd_table: torch.Tensor, static_position: int) -> None:
    return None  # p_hat = q_N; the JSD of any layers read is still reported


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("off", _no_contrast, kernel_code=2, fixed_layer=False, reads_by_default=False,
         help="plain SigLIP: q_N (layers given are read and their JSD reported)"),
    Mode("static", _fixed, kernel_code=1, fixed_layer=True, reads_by_default=True,
         help="a fixed premature layer M = static_layer"),
    Mode("dynamic", _most_distant, kernel_code=0, fixed_layer=False, reads_by_default=True,
         help="per input, M = argmax JSD(q_N || q_j) over the candidate layers"),
)}
BASELINE = "off"  # the mode every other is compared with: the model's own q_N
DEFAULT = "dynamic"  # the design note's mode, where no flag or calibration picks one
CONTRASTING = tuple(name for name, m in MODES.items() if name != BASELINE)  # the DoLa modes, in table order


def mode_of(name) -> Mode:
    """The table's entry for `name`; ValueError naming the valid modes."""
    if not isinstance(name, str) or name not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {name!r}")
    return MODES[name]
