"""Where the product path's time goes at one batch size: GPU kernel time by kind, host time by stage, one run.

The model, bank and points are product.py's (random-init ViT-L-16-SigLIP-384, random LayerNorm affines, bf16
autocast). Per point (plain, plain-graph, off, dynamic3/23 eager and graphed, and the stacked-pooling variants):
- ``wall``: median ms per call, each call synchronised (as product.py), without the profiler;
- ``gpu``: kernel ms per call under torch.profiler, by kind: the pooling kernel, its merge, the scoring kernel,
  stacking copies, and the rest (the backbone, the head tail, cosine logits); ``idle`` = wall - gpu, the time
  the GPU waits on the host (eager at small batch: Python and launches);
- ``host``: per eager call, host ms inside each library stage (``record_function`` ranges around
  ``DoLaSigLIP.embed``, ``Readout.__call__``, the pooler's hooks, kernel launches and ``result()``, and
  ``scoring.score``), wrapped for this run only and restored after. Profiler-inflated: read them as shares.

    python benchmarks/breakdown.py --batch 1 --out benchmarks/results/h200_breakdown_b1.json
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import product   # benchmarks/product.py: model, bank, points
from siglip_dola import config, scoring
from siglip_dola.io import write_json_atomic
from siglip_dola.readout import layer_pooler, readout
from siglip_dola.scorer import DoLaSigLIP

from benchenv import environment

KINDS = (("pool", "_pool_partial_kernel"), ("merge", "_merge_values_kernel"), ("scoring", "_dola_row_kernel"),
         ("stack", "CatArrayBatchedCopy"))
STAGES = ((DoLaSigLIP, "embed"), (readout.Readout, "__call__"), (layer_pooler.LayerPooler, "hold"),
          (layer_pooler.LayerPooler, "add"), (layer_pooler.LayerPooler, "add_entry"),
          (layer_pooler.LayerPooler, "result"), (layer_pooler, "pool_partials"), (layer_pooler, "merge_values"))


@contextlib.contextmanager
def stage_ranges():
    """Wrap each STAGES function (and scoring.score) in a record_function range named after it; restored on exit."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in STAGES] + [(scoring, "score", scoring.score)]

    def ranged(fn, label):
        def call(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return call
    try:
        for owner, name, fn in saved:
            setattr(owner, name, ranged(fn, f"stage:{getattr(owner, '__name__', '')}.{name}"))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def profiled(fn, images, options: dict, calls: int) -> tuple[dict, dict]:
    """(GPU ms per call by kind, host ms per call by stage) of `calls` calls under torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.is_cuda else [])
    with config.override(**options), stage_ranges(), profile(activities=activities) as prof:
        for _ in range(calls):
            fn(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    gpu, host = {kind: 0.0 for kind, _ in KINDS + (("rest", ""),)}, {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us and event.key and not event.key.startswith("stage:"):
            kind = next((k for k, pattern in KINDS if pattern in event.key), "rest")
            gpu[kind] += device_us / 1e3 / calls
        if event.key.startswith("stage:"):
            host[event.key[6:]] = event.cpu_time_total / 1e3 / calls
    gpu["total"] = sum(gpu.values())
    return gpu, host


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per point")
    parser.add_argument("--out", default=None)
    known, rest = parser.parse_known_args(argv)
    args = product.parse_args(rest + ["--batches", str(known.batch), "--stacked-max-batch", str(max(known.batch, 8))])
    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded, encode, module = product.build(args, device)
    bank = torch.randn(args.classes, loaded.readout.embed_dim, generator=torch.Generator().manual_seed(5)).to(device)
    images = torch.randn(known.batch, 3, *loaded.readout.image_size, generator=torch.Generator().manual_seed(1))
    images = images.to(device)
    bank_n = torch.nn.functional.normalize(bank, dim=-1)
    points, options = {"plain": product.plain_call(encode, bank_n, loaded.tau, loaded.dtype, device)}, {}
    graphs = device.type == "cuda"
    if graphs:
        points["plain-graph"] = product.plain_graph(points["plain"], images, loaded.dtype, device)
    other = product.other_pooling(known.batch, args)
    sets = product.layer_sets(loaded.readout.num_layers)
    for name in ("off", "dynamic3", "dynamic23"):
        for suffix, opts in [("", {})] + ([other] if other and name != "off" else []):
            for graph in ([False, True] if graphs else [False]):
                scorer = DoLaSigLIP(loaded, cuda_graphs=graph, batch_size=known.batch, **sets[name])
                key = name + suffix + ("-graph" if graph else "")
                points[key], options[key] = (lambda x, s=scorer: s.score_pixels(x, bank)), opts
    walls = product.run_rounds(points, images, args, device, options)
    env = environment(device)
    rows = []
    for key, fn in points.items():
        gpu, host = profiled(fn, images, options.get(key, {}), known.calls)
        wall = statistics.median(walls[key])
        rows.append(dict(point=key, batch=known.batch, wall_ms=wall, gpu_ms=gpu, idle_ms=max(wall - gpu["total"], 0.0),
                         host_ms=host))
    print(env)
    print(format_rows(rows, env.get("gpu", "cpu")))
    if known.out:
        write_json_atomic(known.out, dict(environment=env, args=dict(vars(args), calls=known.calls), rows=rows))
    return 0


def format_rows(rows: list[dict], device_name: str) -> str:
    kinds = [k for k, _ in KINDS] + ["rest"]
    lines = [f"device: {device_name}; ms per call (wall: no profiler; gpu: kernel time under the profiler)",
             f"{'point':24} {'wall':>8} {'gpu':>8} {'idle':>7} " + " ".join(f"{k:>8}" for k in kinds)]
    for r in rows:
        lines.append(f"{r['point']:24} {r['wall_ms']:8.3f} {r['gpu_ms']['total']:8.3f} {r['idle_ms']:7.3f} "
                     + " ".join(f"{r['gpu_ms'][k]:8.3f}" for k in kinds))
    lines.append("host ms per eager call inside each stage (nested: embed holds __call__ holds the pooler's):")
    for r in rows:
        if r["host_ms"] and not r["point"].endswith("graph"):
            lines.append(f"  {r['point']:22} " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["host_ms"].items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
