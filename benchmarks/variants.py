"""Readout variants for benchmarks/overhead.py: library switch settings, and floors that replace the pooling.

Each variant names fields of ``siglip_dola.readout.pooler.FUSED`` to set while it runs (:func:`fused_config`
restores them). Floors swap the pooling kernel for a plain read of each captured layer (and, for the
``readonly*`` ones, skip the head tail): the cost no readout that leaves the model's forward unchanged can beat.
"""
from __future__ import annotations

import contextlib

import torch

from siglip_dola.readout import pooler as fused, kernel as pool_kernel

VARIANTS = {  # name -> fields of fused.FUSED set for that variant ("onepass-tuned": filled by --kernel-sweep)
    "unfused": dict(enabled=False, side_stream=False),
    "onepass": dict(enabled=True, side_stream=False),
    "onepass-stream": dict(enabled=True, side_stream=True),
    "onepass-tuned": dict(enabled=True, side_stream=False),
    "onepass-oldplan": dict(enabled=True, side_stream=False, entry_norms=False),   # before run 20: see PLANS
    "onepass-stats": dict(enabled=True, side_stream=False, entry_norms=False),   # raw block outputs (before run 21)
    "onepass-t32": dict(enabled=True, side_stream=False, block_t=32, num_stages=2),
    "readfloor": dict(enabled=True, side_stream=False),       # floors: see FLOORS
    "readonly": dict(enabled=True, side_stream=False),
    "readonly-flat": dict(enabled=True, side_stream=False),
}


def _read_floor_launch(pooler, slot, tokens, entry=None):
    """'readfloor': read every captured layer once (tokens.sum()), nothing else: the cost no kernel beats.

    Its z_layers are meaningless (the partials stay unwritten); only its time is reported."""
    pooler._out[slot].view(-1)[0] = tokens.sum()


if fused.triton is not None:
    tl = pool_kernel.tl

    @fused.triton.jit
    def _flat_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        """Sum one contiguous chunk of BLOCK * STEPS elements per program: a plain streaming read."""
        start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
        acc = tl.zeros([BLOCK], tl.float32)
        for step in range(STEPS):
            offs = start + step * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _flat_read_launch(pooler, slot, tokens, entry=None):
    """'readonly-flat': each layer read once by a streaming Triton kernel over its memory (timm: (B, D, T))."""
    flat = tokens.transpose(1, 2) if tokens.transpose(1, 2).is_contiguous() else tokens.contiguous()
    flat = flat.reshape(-1)
    block, steps = 4096, 8
    programs = fused.triton.cdiv(flat.numel(), block * steps)
    partial = pooler._out[slot].view(-1)[:programs]   # scratch: the partials are never read
    _flat_read_kernel[(programs,)](flat, partial, flat.numel(), BLOCK=block, STEPS=steps, num_warps=8)


def _no_tail_result(pooler):
    """Floor variants 'readonly*': skip the head tail too (placeholder z_layers of width 1)."""
    return torch.zeros(pooler.num_slots, pooler._out.shape[1], 1, device=pooler._out.device)


def _old_split_plan(batch, num_tokens, slots, block_t=fused.BLOCK_T):
    """The split plan before run 20: about 2 x slots programs (5 splits at batch 64, 2.4 waves on an H100)."""
    max_splits = -(-num_tokens // block_t)
    splits = max(1, min(max_splits, -(-2 * slots // max(batch, 1))))
    tokens_per_split = -(-(-(-num_tokens // splits)) // block_t) * block_t
    return tokens_per_split, -(-num_tokens // tokens_per_split)


PLANS = {"onepass-oldplan": _old_split_plan}   # variant -> fused.split_plan stand-in


FLOORS = {  # variant -> (LayerPooler._launch, LayerPooler.result or None to keep the real tail)
    "readfloor": (_read_floor_launch, None),
    "readonly": (_read_floor_launch, _no_tail_result),
    "readonly-flat": (_flat_read_launch, _no_tail_result),
}


@contextlib.contextmanager
def fused_config(variant: str):
    """Set the library's fast-path switches for one variant; restored afterwards."""
    fields = VARIANTS[variant]
    saved = {name: getattr(fused.FUSED, name) for name in fields}
    launch, result, plan = fused.LayerPooler._launch, fused.LayerPooler.result, fused.split_plan
    fused.split_plan = PLANS.get(variant, plan)
    for name, value in fields.items():
        setattr(fused.FUSED, name, value)
    if variant in FLOORS:
        fused.LayerPooler._launch = FLOORS[variant][0]
        fused.LayerPooler.result = FLOORS[variant][1] or result
    try:
        yield
    finally:
        fused.LayerPooler._launch, fused.LayerPooler.result, fused.split_plan = launch, result, plan
        for name, value in saved.items():
            setattr(fused.FUSED, name, value)


def usable_variants(args, device: torch.device) -> list[str]:
    fast = device.type == "cuda" and fused.triton is not None
    names = args.variants.split(",") if args.variants else (["unfused", "onepass", "onepass-stream"] if fast else ["unfused"])
    bad = [n for n in names if n not in VARIANTS or (n != "unfused" and not fast)]
    if bad:
        raise SystemExit(f"--variants {bad} unusable here (fused needs CUDA + triton); valid: {list(VARIANTS)}")
    if "onepass-tuned" in names and not args.kernel_sweep:
        raise SystemExit("--variants onepass-tuned needs --kernel-sweep B (it takes the fastest swept config)")
    return names
