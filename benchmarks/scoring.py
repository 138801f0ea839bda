"""GPU time of the scoring step alone, as it runs after a forward.

After a batch-64 forward the CPU is far ahead of the GPU, so the scoring's kernels are already queued
when the GPU reaches them: what counts is their GPU time back to back, not their launch cost. This
script measures exactly that: it queues a long matmul first (the GPU stays busy), then records a CUDA
event, queues the scoring, records another event; the difference is the scoring's GPU time when queued.
The call's single host read is inside: the end event is recorded once the call returns, so the number
is the scoring's GPU time plus the wake-up after that read, as in a real call.
Also printed: the kernel list of one call (torch.profiler).

    python benchmarks/scoring.py --batch 64 --classes 1000 --layers 3,23 --out scoring.json
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from siglip_dola import config, scoring
from siglip_dola.io import write_json_atomic

DIM = 1024


def queued_ms(fn, busy: torch.Tensor, runs: int = 30) -> float:
    """Median GPU time of fn()'s kernels queued behind other work (events around the queue, not the host read)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.autocast("cuda", enabled=False):
            busy @ busy                               # ~3 ms of fp32 GPU work, so that the CPU runs ahead
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        del result
    return statistics.median(samples)


def points(batch: int, classes: int, count: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(count)
    z_final = torch.randn(batch, DIM, generator=generator).to(device)
    z_layers = torch.randn(count, batch, DIM, generator=generator).to(device) * 0.5 + z_final
    bank = F.normalize(torch.randn(classes, DIM, generator=generator), dim=-1).to(device)
    layers, tau = list(range(24 - count, 24)), 0.1

    def score(triton_scoring: bool):
        def run():
            with config.override(triton_scoring=triton_scoring):
                return scoring.score(z_final, z_layers, bank, tau, layers)
        return run

    return {"baseline: build_probs_from_rep": lambda: scoring.build_probs_from_rep(z_final, bank, tau),
            f"score J={count} eager": score(False), f"score J={count} triton": score(True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--layers", default="3,23")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    rows = []
    for autocast in (False, True):
        for count in [int(c) for c in args.layers.split(",")]:
            for name, fn in points(args.batch, args.classes, count, device).items():
                try:
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        ms = queued_ms(fn, busy)
                        with torch.profiler.profile() as prof:
                            fn()
                            torch.cuda.synchronize()
                except Exception as error:  # one failing path must not hide the others' numbers
                    rows.append(dict(name=name, autocast_bf16=autocast, error=f"{type(error).__name__}: {error}"[:300]))
                    print(rows[-1], flush=True)
                    continue
                kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
                launches = sum(e.count for e in kernels)
                rows.append(dict(name=name, autocast_bf16=autocast, queued_ms=ms, kernel_launches=launches))
                print(rows[-1], flush=True)
                if name.endswith("eager") and count == 3 and autocast:
                    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40,
                                                    max_name_column_width=50))
    print(f"\n{torch.cuda.get_device_name(device)}, batch {args.batch}, C={args.classes}, D={DIM}")
    for row in [r for r in rows if "queued_ms" in r]:
        print(f"{row['name']:42} autocast={int(row['autocast_bf16'])} {row['queued_ms'] * 1e3:8.1f} us queued "
              f"{row['kernel_launches']:4d} kernels")
    if args.out:
        env = dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, command=" ".join(sys.argv))
        write_json_atomic(args.out, dict(environment=env, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
