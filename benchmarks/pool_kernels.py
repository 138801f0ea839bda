"""The pooling kernel alone on one captured layer, against the read floor; and overhead.py's launch-config sweep.

One layer of ViT-L/16-384 at batch B in timm's layout ((B, D, T) in memory, fp32 under autocast, plus bf16),
per kernel config: median of 30 CUDA-event timings after 3 warm-ups, read GB/s (token bytes / time), and the
relative error of the pooled (B, H, D) vs a float64 reference. Floors: ``tokens.sum()`` (one read, the
library's best case), a streaming Triton read of the layer's memory, and ``tokens.clone()`` (read + write). Two other kernel designs (a raw-x
one-pass and a two-stage split-D kernel, commit 7cd8d56) were slower and were removed.

    python benchmarks/pool_kernels.py --batch 64 --out pool_kernels.json
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from siglip_dola.io import write_json_atomic
from siglip_dola.readout import kernel, map_head
from variants import VARIANTS

if kernel.triton is not None:
    tl = kernel.tl

    @kernel.triton.jit
    def _flat_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        """Sum one contiguous chunk of BLOCK * STEPS elements per program: a plain streaming read (the floor)."""
        start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
        acc = tl.zeros([BLOCK], tl.float32)
        for step in range(STEPS):
            offs = start + step * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))

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
    """name -> (run, read_pooled) for each launch config of the library's one-pass kernel.

    "entry-norm" rows read what the next block's first LayerNorm returns (fp32, (B, T, D) contiguous, a random
    affine) in the kernel's shifted mode (pooler.EntryNorm), the library's path for layers 1..N-1."""
    batch = tokens.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(1)
    gamma = (torch.rand(DIM, generator=generator) * 1.2 + 0.3).to(tokens.device)
    beta = torch.randn(DIM, generator=generator).to(tokens.device)
    normed = torch.nn.functional.layer_norm(tokens.float(), (DIM,), gamma, beta, eps)
    shifted, entry_probe = dict(shift=beta, scale=1.0 / gamma), (probe / gamma).contiguous()
    runs = {}
    for kind, warps, block_t, stages in (("onepass", 8, 16, 3), ("onepass", 8, 32, 2), ("entry-norm", 8, 16, 3)):
        per, splits = kernel.split_plan(batch, TOKENS, num_sms, block_t)
        out = torch.full((batch, HEADS, splits, DIM), float("nan"), device=tokens.device)
        lse = torch.full(out.shape[:-1], float("nan"), device=tokens.device)
        if kind == "entry-norm":
            run = lambda o=out, l=lse, p=per: kernel.pool_partials(normed, entry_probe, None, o, l, p, **shifted)
        else:
            run = lambda w=warps, t=block_t, s=stages, o=out, l=lse, p=per: kernel.pool_partials(
                tokens, probe, eps, o, l, p, w, t, s)
        runs[f"{kind} w{warps} t{block_t} s{stages}"] = (run, lambda o=out, l=lse: kernel.combine_partials(o, l))
    return runs


# ---------------------------------------------------------------- launch-config sweep (overhead.py --kernel-sweep)
SWEEP_WARPS, SWEEP_BLOCK_T, SWEEP_STAGES = (8, 16, 32), (16, 32), (1, 2, 3)


SWEEP_TARGETS = (1, 2, 4, 8)   # x the number of SMs: grid = (B, token splits)


def _kernel_runner(tokens, probe, eps, config: dict):
    """(run, read_pooled, splits) for one launch config of the pooling kernel on tokens (B, T, D)."""
    batch, num_tokens, dim = tokens.shape
    per_split, splits = kernel.split_plan(batch, num_tokens, config["target_programs"], config["block_t"])
    out = torch.full((batch, probe.shape[0], splits, dim), float("nan"), device=tokens.device)   # poisoned
    lse = torch.full(out.shape[:-1], float("nan"), device=tokens.device)
    run = lambda: kernel.pool_partials(tokens, probe, eps, out, lse, per_split, config["num_warps"],
                                      config["block_t"], config["num_stages"])
    return run, lambda: kernel.combine_partials(out, lse), splits


def _sweep_configs(num_sms: int, spec: str | None) -> list[dict]:
    """Launch configs: the full grid, or ``spec`` = comma list of warps:block_t:stages:programs_per_SM."""
    grid = ([tuple(int(v) for v in item.split(":")) for item in spec.split(",")] if spec else
            [(w, t, s, k) for w in SWEEP_WARPS for t in SWEEP_BLOCK_T for s in SWEEP_STAGES for k in SWEEP_TARGETS])
    return [dict(num_warps=w, block_t=t, num_stages=s, target_programs=k * num_sms) for w, t, s, k in grid]


def _time_config(tokens, probe, eps, reference, config) -> dict:
    row = dict(config)
    try:
        run, read, row["splits"] = _kernel_runner(tokens, probe, eps, config)
        row["ms"] = timed(run)                                   # 3 warm-ups, median of 30
        row["combine_ms"] = timed(read, runs=10)
        row["rel_err"] = float((read().double() - reference).norm() / reference.norm())
        row["read_gb_per_s"] = tokens.nbytes / row["ms"] / 1e6
    except Exception as error:  # e.g. triton OutOfResources for a too-large config: record, go on
        row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
    return row


def kernel_sweep(trunk, batch: int, device: torch.device, spec: str | None = None) -> list[dict]:
    """The pooling kernel alone on one layer (B, T, D) per launch config: fp32 tokens (autocast), then bf16 best."""
    folded = map_head.fold(map_head.timm_map_parts(trunk.attn_pool, post=lambda pooled: pooled), trunk.norm)
    num_tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    probe, eps = folded.key_probe, folded.norm_eps
    rows = []
    configs = _sweep_configs(torch.cuda.get_device_properties(device).multi_processor_count, spec)
    for dtype in (torch.float32, torch.bfloat16):
        # the layout timm's residual stream has: (B, D, T) in memory, strides (T*D, 1, T)
        tokens = torch.randn(batch, trunk.embed_dim, num_tokens, device=device).mul(3).add(0.5).to(dtype).transpose(1, 2)
        reference = map_head.pool_tokens(tokens.double(), probe.double(), eps)
        copy_ms = timed(lambda: tokens.clone(), runs=20)  # clone keeps the layout
        print(f"kernel B={batch} {dtype}: copy (read+write) {2 * tokens.nbytes / copy_ms / 1e6:.0f} GB/s", flush=True)
        if dtype == torch.bfloat16:  # under autocast timm's tokens are fp32: bf16 tokens only for the best configs
            configs = [{k: r[k] for k in configs[0]} for r in sorted(ok_rows(rows), key=lambda r: r["ms"])[:3]]
        for config in configs:
            row = dict(_time_config(tokens, probe, eps, reference, config), dtype=str(dtype), copy_ms=copy_ms)
            rows.append(row)
            print("kernel", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def ok_rows(rows: list[dict], dtype: str = "torch.float32") -> list[dict]:
    """Sweep rows that ran and match the float64 reference (the kernel's fp16 products: ~3e-4)."""
    return [r for r in rows if r.get("dtype", dtype) == dtype and "ms" in r and r["rel_err"] < 2e-3]


def tune_from_sweep(rows: list[dict]) -> dict:
    """Set the onepass-tuned variant to the fastest accurate fp32 config of the sweep; returns it."""
    best = min(ok_rows(rows), key=lambda r: r["ms"])
    tuned = {k: best[k] for k in ("num_warps", "block_t", "num_stages", "target_programs")}
    VARIANTS["onepass-tuned"].update(tuned)
    print(f"onepass-tuned = {tuned}: {best['ms'] * 1e3:.0f} us, {best['read_gb_per_s']:.0f} GB/s", flush=True)
    return tuned


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
        reference = map_head.pool_tokens(tokens.double(), probe.double(), 1e-6)
        nbytes = tokens.nelement() * tokens.element_size()
        flat = tokens.transpose(1, 2).reshape(-1)        # the layer's own memory order, no copy
        programs = -(-flat.numel() // (4096 * 8))
        partial = torch.empty(programs, device=device)
        floors = {"floor: tokens.sum()": lambda: tokens.sum(), "floor: tokens.clone()": lambda: tokens.clone(),
                  "floor: Triton streaming read": lambda: _flat_read_kernel[(programs,)](
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
                   triton=getattr(kernel.triton, "__version__", None), command=" ".join(sys.argv))
        write_json_atomic(args.out, dict(environment=env, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
