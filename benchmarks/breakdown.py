"""Where the product path's time goes at one batch size: GPU kernel time by kind, host time by stage, one run.

The model, bank and points are product.py's (random-init ViT-L-16-SigLIP-384, random LayerNorm affines, bf16
autocast). Per point (plain, plain-graph, off, dynamic3/23 eager and graphed, and the stacked-pooling variants):
- ``wall``: median ms per call, each call synchronised (as product.py), without the profiler;
- ``gpu``: kernel ms per call under torch.profiler, by kind: the pooling kernel, its merge, the scoring kernel,
  stacking copies, and the rest (the backbone, the head tail, cosine logits); ``idle`` = wall - gpu, the time
  the GPU waits on the host (eager at small batch: Python and launches);
- ``host``: per eager call, host ms inside each library stage (cProfile cumulative time of ``DoLaSigLIP.embed``,
  ``Readout.__call__``, the pooler's hooks, kernel launches and ``result()``, ``scoring.score`` and its parts),
  and in torch's C functions. Profiler-inflated: read them as shares.

    python benchmarks/breakdown.py --batch 1 --out benchmarks/results/h200_breakdown_b1.json
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import product   # benchmarks/product.py: model, bank, points
from siglip_dola import config
from siglip_dola.io import write_json_atomic
from siglip_dola.scorer import DoLaSigLIP

from benchenv import environment
from norms import randomize_norms
from stages import stage_seconds

KINDS = (("pool", "_pool_partial_kernel"), ("merge", "_merge_values_kernel"), ("scoring", "_dola_row_kernel"),
         ("stack", "CatArrayBatchedCopy"))
STAGE_NAMES = ("embed", "__call__", "hold", "add", "add_entry", "result", "_pool_stacked", "pool_partials",
               "merge_values", "merge_values_triton", "score", "_score_rows", "dola_rows", "rep_logits", "_rows",
               "_current_head", "begin", "tail", "check_finite")   # library functions whose host time is reported


def profiled(fn, images, options: dict, calls: int) -> dict:
    """GPU ms per call by kernel kind, `calls` calls under torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.is_cuda else [])
    with config.override(**options), profile(activities=activities) as prof:
        for _ in range(calls):
            fn(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    gpu = {kind: 0.0 for kind, _ in KINDS + (("rest", ""),)}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us and event.key:
            gpu[next((k for k, pattern in KINDS if pattern in event.key), "rest")] += device_us / 1e3 / calls
    gpu["total"] = sum(gpu.values())
    return gpu


def host_stages(fn, images, options: dict, calls: int) -> dict:
    """Host ms per call inside each siglip_dola function of STAGE_NAMES (stages.py: cProfile, read as shares)."""
    def run():
        fn(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    with config.override(**options):
        return {k: v * 1e3 for k, v in stage_seconds(run, STAGE_NAMES, calls).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per point")
    parser.add_argument("--reload", action="store_true",
                        help="first call every point, then give every LayerNorm a trained-like affine in place "
                             "(product.py's reload) and time after it")
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
    sets = product.layer_sets(loaded.readout.num_layers)
    for name in ("off", "dynamic3", "dynamic23"):
        for graph in ([False, True] if graphs else [False]):
            others = product.other_pooling(known.batch, args, graph) if name != "off" else []
            for suffix, opts in [("", {})] + others:
                scorer = DoLaSigLIP(loaded, cuda_graphs=graph, batch_size=known.batch, **sets[name])
                key = name + suffix + ("-graph" if graph else "")
                points[key], options[key] = (lambda x, s=scorer: s.score_pixels(x, bank)), opts
    if known.reload:
        for key, fn in points.items():
            with config.override(**options.get(key, {})):
                fn(images)
        randomize_norms(module, trained_like=True, seed=2)
        if graphs:   # the plain graph replays its capture: capture it again on the new weights
            points["plain-graph"] = product.plain_graph(points["plain"], images, loaded.dtype, device)
    walls = product.run_rounds(points, images, args, device, options)
    env = environment(device)
    rows = []
    for key, fn in points.items():
        gpu = profiled(fn, images, options.get(key, {}), known.calls)
        host = {} if key.endswith("graph") else host_stages(fn, images, options.get(key, {}), known.calls)
        wall = statistics.median(walls[key])
        rows.append(dict(point=key, batch=known.batch, reload=known.reload, wall_ms=wall, gpu_ms=gpu, idle_ms=max(wall - gpu["total"], 0.0),
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
    lines.append("host ms per eager call inside each stage (cProfile, nested: embed holds __call__ holds the pooler's):")
    for r in rows:
        if r["host_ms"]:
            lines.append(f"  {r['point']}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                   sorted(r["host_ms"].items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
