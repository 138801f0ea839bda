"""Is eager DoLa's extra cost (over its CUDA-graph replay) CPU work while the GPU idles? Give the GPU a head start.

Before each timed call the GPU gets a `torch.cuda._sleep` (~8 ms on an H100), so the CPU's work before the first
kernel (layer checks, cache keys, hook registration) overlaps it; the sleep alone is subtracted. If eager DoLa
then costs about what its graph replay does, the eager extra is CPU-side. bf16 autocast, batch 64, random-init
open_clip ViT-L-16-SigLIP-384, 1000-class bank; medians of 25 calls, two rounds (CUDA only). Also the CPU time
of the readout's set-up alone (3 and 23 layers).

    python benchmarks/head_start.py --out head_start.json
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from siglip_dola import scoring
from siglip_dola.io import write_json_atomic
from siglip_dola.readout import from_model

SLEEP_CYCLES = 10_000_000


def timed(fn, head_start: bool, runs: int = 25) -> float:
    samples = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if head_start:
            torch.cuda._sleep(SLEEP_CYCLES)
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def setup_ms(readout, images, layers, runs: int = 20) -> float:
    """CPU time of a readout call without its forward (the model's embedding swapped for a stub): what the GPU
    waits for before the first kernel. The call then fails (no block ran): that is expected here."""
    stub = dataclasses.replace(readout._tower, embed=lambda x: torch.zeros(x.shape[0], 1, device=x.device))
    real, readout._tower = readout._tower, stub
    samples = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            try:
                readout(images, layers)
            except RuntimeError:   # "blocks never ran"
                pass
            samples.append((time.perf_counter() - start) * 1e3)
    finally:
        readout._tower = real
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-16-SigLIP-384", pretrained=None).to("cuda").eval()
    readout = from_model(model)
    images = torch.randn(64, 3, 384, 384, device="cuda")
    bank = torch.nn.functional.normalize(torch.randn(1000, 1024, device="cuda"), dim=-1)

    def dola(layers):
        z_final, z_layers = readout(images, layers)
        return scoring.score(z_final, z_layers, bank, 0.01, layers, mode="dynamic")

    calls = {"baseline": lambda: scoring.build_probs_from_rep(model.encode_image(images), bank, 0.01),
             "dola3": lambda: dola([18, 20, 22]), "dola23": lambda: dola(list(range(1, 24)))}
    rows = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for fn in calls.values():
            for _ in range(3):
                fn()
        setup = {f"setup_ms_{len(layers)}_layers": setup_ms(readout, images, layers)
                 for layers in ([18, 20, 22], list(range(1, 24)))}
        print(setup, flush=True)
        sleep_ms = timed(lambda: None, True)
        for round_ in range(2):
            for head_start in (False, True):
                ms = {name: timed(fn, head_start) - (sleep_ms if head_start else 0.0) for name, fn in calls.items()}
                row = dict(round=round_, head_start=head_start, baseline_ms=ms["baseline"],
                           dola3_ratio=ms["dola3"] / ms["baseline"], dola23_ratio=ms["dola23"] / ms["baseline"])
                rows.append(row)
                print(row, flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, sleep_ms=sleep_ms, **setup, rows=rows)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
