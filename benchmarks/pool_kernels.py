"""The pooling kernel alone on one captured layer, against the read floor (issue #8).

One layer of ViT-L/16-384 at batch B in timm's layout ((B, D, T) in memory, fp32 under autocast, plus bf16),
per kernel config: median of 30 CUDA-event timings after 3 warm-ups, read GB/s (token bytes / time), and the
relative error of the pooled (B, H, D) vs a float64 reference. Floors: ``tokens.sum()`` (one read, the
library's best case), a streaming Triton read of the layer's memory, and ``tokens.clone()`` (read + write). Run 8 also timed two other kernel designs
here (a raw-x one-pass and a two-stage split-D kernel, commit 7cd8d56); both were slower and were removed.

    python benchmarks/pool_kernels.py --batch 64 --out pool_kernels.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import overhead  # benchmarks/overhead.py: its streaming-read floor kernel
from siglip_dola.io import write_json_atomic
from siglip_dola.readout import fused

HEADS, DIM, TOKENS = 16, 1024, 576


def timed(fn, runs: int = 30) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def candidates(tokens, probe, eps, num_sms: int) -> dict:
    """name -> (run, read_pooled) for each launch config of the library's one-pass kernel."""
    batch = tokens.shape[0]
    runs = {}
    for warps, block_t, stages in ((8, 16, 3), (8, 32, 2)):
        per, splits = fused.split_plan(batch, TOKENS, 2 * num_sms, block_t)
        out = torch.full((batch, HEADS, splits, DIM), float("nan"), device=tokens.device)
        lse = torch.full(out.shape[:-1], float("nan"), device=tokens.device)
        runs[f"onepass w{warps} t{block_t} s{stages}"] = (
            lambda w=warps, t=block_t, s=stages, o=out, l=lse, p=per: fused.pool_partials(tokens, probe, eps, o, l, p, w, t, s),
            lambda o=out, l=lse: fused.combine_partials(o, l))
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(HEADS, DIM, generator=generator) * 0.05).to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        tokens = (torch.randn(args.batch, DIM, TOKENS, generator=generator) * 3 + 0.5).to(device, dtype).transpose(1, 2)
        reference = fused.pool_reference(tokens.double(), probe.double(), 1e-6)
        nbytes = tokens.nelement() * tokens.element_size()
        flat = tokens.transpose(1, 2).reshape(-1)        # the layer's own memory order, no copy
        programs = -(-flat.numel() // (4096 * 8))
        partial = torch.empty(programs, device=device)
        floors = {"floor: tokens.sum()": lambda: tokens.sum(), "floor: tokens.clone()": lambda: tokens.clone(),
                  "floor: Triton streaming read": lambda: overhead._flat_read_kernel[(programs,)](
                      flat, partial, flat.numel(), BLOCK=4096, STEPS=8, num_warps=8)}
        for name, fn in floors.items():
            ms = timed(fn)
            rows.append(dict(dtype=str(dtype), name=name, ms=ms, read_gb_s=nbytes / ms / 1e6))
            print(rows[-1], flush=True)
        for name, (run, read) in candidates(tokens, probe, 1e-6, num_sms).items():
            row = dict(dtype=str(dtype), name=name)
            try:
                ms = timed(run)
                error = float((read().double() - reference).norm() / reference.norm())
                row.update(ms=ms, read_gb_s=nbytes / ms / 1e6, rel_err=error)
            except Exception as exc:  # e.g. out of shared memory for a config: record, go on
                row["error"] = f"{type(exc).__name__}: {str(exc)[:100]}"
            rows.append(row)
            print(row, flush=True)
    print(f"\n{torch.cuda.get_device_name(device)}, batch {args.batch}, one layer {TOKENS} x {DIM}, fp32 then bf16")
    for row in sorted(rows, key=lambda r: (r["dtype"], r.get("ms", 1e9))):
        if "ms" in row:
            print(f"{row['dtype']:15} {row['name']:42} {row['ms'] * 1e3:8.1f} us {row['read_gb_s']:7.0f} GB/s "
                  f"err {row.get('rel_err', float('nan')):.1e}")
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__,
                   triton=getattr(fused.triton, "__version__", None), command=" ".join(sys.argv))
        write_json_atomic(args.out, dict(environment=env, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
