"""Cost of DoLa over the plain SigLIP forward, all ratios from one process and one run.

Baseline: the model's own embedding path (open_clip ``encode_image``; a timm tower's forward in
``--quick``) plus scoring against an ImageNet-1k-sized text bank [1000, D]. DoLa: ``readout(images,
layers)`` (same forward, layer readout) plus ``scoring.score`` (dynamic). Variants of the readout:
``unfused`` (folded head per layer in PyTorch), ``onepass`` (Triton one-pass pooling, all tails batched;
the library default on CUDA), ``onepass-stats`` (pooled from raw block outputs). Timings are medians
of ``--runs`` runs after warm-up, CUDA events on GPU; the variants are interleaved run by run.
Variants and floors live in ``variants.py``, the timed callables in ``points.py``, the kernel sweep in
``pool_kernels.py`` (all in benchmarks/).

    python benchmarks/overhead.py --device cpu --quick                    # ~1 min on 2 CPU cores
    python benchmarks/overhead.py --batches 64 --dtypes bf16 --layers 3,23 --out overhead.json
    python benchmarks/overhead.py --model ViT-L-14-336 --batches 64 --layers 3,23 --variants unfused  # CLIP: the token
                                                       # head has no kernel and ignores the fused switches
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from siglip_dola.io import write_json_atomic
from siglip_dola import config
from siglip_dola.readout import from_model

from benchenv import environment
from points import first_call, fused_errors, gpu_busy, make_points, peak_mib, profile, scoring_diffs
from pool_kernels import kernel_sweep, tune_from_sweep
from variants import VARIANTS, usable_variants

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny timm tower, small batches (CPU smoke run)")
    parser.add_argument("--model", default="ViT-L-16-SigLIP-384", help="open_clip model name (random init)")
    parser.add_argument("--batches", default=None, help="comma list; default 1,8,64,256 (quick: 1,4)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--layers", default="3,8,23", help="comma list of candidate-layer counts")
    parser.add_argument("--variants", default=None, help=f"comma list of {list(VARIANTS)}; default: all usable")
    parser.add_argument("--classes", type=int, default=1000, help="text bank size C")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per point (default 20, quick 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--split", action="store_true", help="also time the readout alone (no scoring)")
    parser.add_argument("--eager-scoring", action="store_true",
                        help="also time each DoLa point with config triton_scoring=False (eager PyTorch scoring), '-es'")
    parser.add_argument("--cpu-slack", type=float, default=0.0, metavar="MS",
                        help="also time each readout followed by MS ms of CPU sleep: shows whether the CPU runs ahead")
    parser.add_argument("--graphs", action="store_true",
                        help="also time baseline and DoLa with the forward replayed as a CUDA graph (readout.cuda_graphs)")
    parser.add_argument("--gpu-busy", action="store_true",
                        help="profile one call per point: GPU kernel time, span and kernel count (CUDA)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table (CUDA)")
    parser.add_argument("--kernel-sweep", type=int, default=0, metavar="B",
                        help="first time the Triton kernel alone at batch B over launch configs (CUDA)")
    parser.add_argument("--sweep-configs", default=None, metavar="W:BT:ST:K,...",
                        help="kernel-sweep only these warps:block_t:stages:programs-per-SM (default: the full grid)")
    parser.add_argument("--target-programs", type=int, default=0, help="programs the fused kernel may run at once, for its split plan (0: the number of SMs)")
    parser.add_argument("--num-warps", type=int, default=8, help="fused kernel warps per program")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,8,64,256")).split(",")]
    args.dtypes = args.dtypes.split(",")
    args.layers = [int(k) for k in args.layers.split(",")]
    args.runs = args.runs or (5 if args.quick else 20)
    args.warmup = min(args.warmup, 1) if args.quick else args.warmup
    if any(d not in DTYPES for d in args.dtypes):
        parser.error(f"--dtypes must be among {list(DTYPES)}, got {args.dtypes}")
    if args.runs < 1 or args.warmup < 0 or min(args.batches) < 1 or min(args.layers) < 1:
        parser.error("--runs, --batches, --layers must be >= 1 and --warmup >= 0")
    return args


def build_model(args):
    """(model, trunk, embed_fn, logit_scale, image_size) with random init, eval mode, on args.device."""
    if args.quick:
        import timm
        model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=12,
                                  embed_dim=128, num_heads=4, img_size=64)
        return model.eval().to(args.device), model, model, 10.0 ** 0.5, (64, 64)
    import open_clip
    model = open_clip.create_model(args.model, pretrained=None, device=args.device).eval()
    trunk = getattr(model.visual, "trunk", model.visual)   # CLIP-family: the VisionTransformer itself (no sweep)
    size = trunk.patch_embed.img_size if hasattr(model.visual, "trunk") else model.visual.image_size
    return model, trunk, model.encode_image, float(model.logit_scale.detach()), tuple(size)


def layer_sets(num_layers: int, counts: list[int]) -> dict[int, list[int]]:
    """count -> candidate layers: the last ``count`` even layers below N, else the last ``count`` layers."""
    evens = list(range(2, num_layers, 2))
    sets = {}
    for count in counts:
        count = min(count, num_layers - 1)  # e.g. 23 on the 12-layer --quick tower reads all 11
        sets[count] = evens[-count:] if count <= len(evens) else list(range(num_layers - count, num_layers))
    return sets


class Timer:
    """Elapsed milliseconds of fn(): CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def measure_point(args, model_parts, readout, dtype_name: str, batch: int, device, variants) -> list[dict]:
    """Time every variant at one (dtype, batch), interleaved run by run; rows with ratios to the baseline."""
    embed, logit_scale, image_size = model_parts
    generator = torch.Generator(device="cpu").manual_seed(batch)
    images = torch.randn(batch, 3, *image_size, generator=generator).to(device)
    bank = F.normalize(torch.randn(args.classes, readout.embed_dim, generator=generator), dim=-1).to(device)
    tau = 1.0 / float(torch.tensor(logit_scale).exp())
    sets = layer_sets(readout.num_layers, args.layers)
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype_name], enabled=DTYPES[dtype_name] is not None)
    timer, rows = Timer(device), []
    with torch.inference_mode(), autocast:
        points = make_points(embed, readout, images, bank, tau, sets, variants, args.split, args.eager_scoring,
                             args.cpu_slack, args.graphs)
        first_call_ms = {name: first_call(fn, device) for name, fn in points.items()}
        for fn in points.values():
            for _ in range(args.warmup):
                fn()
        diffs = scoring_diffs(points)
        times = {name: [] for name in points}
        for _ in range(args.runs):
            for name, fn in points.items():
                times[name].append(timer(fn))
        peaks = {name: peak_mib(fn, device) for name, fn in points.items()}
        errors = fused_errors(readout, images, sets[max(sets)], variants)
        if args.profile:
            profile(points, ["baseline"] + [f"dola{count}-{variants[-1]}" for count in sorted(sets)])
        busy = gpu_busy(points) if args.gpu_busy else {}
    base = statistics.median(times["baseline"])
    graph_base = statistics.median(times["baseline-graph"]) if "baseline-graph" in times else None
    for name, samples in times.items():
        median = statistics.median(samples)
        paired = [t / b for t, b in zip(samples, times["baseline"])]  # same run: slow drift cancels
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        rows.append(dict(dtype=dtype_name, batch=batch, point=name, median_ms=median, ratio=median / base,
                         ratio_vs_graph_baseline=median / graph_base if graph_base and "graph" in name else None,
                         paired_ratio_vs_graph_baseline=statistics.median(
                             t / b for t, b in zip(samples, times["baseline-graph"])) if graph_base and "graph" in name else None,
                         paired_ratio=quartiles[1], paired_ratio_iqr=[quartiles[0], quartiles[2]],
                         gpu_busy=busy.get(name),
                         min_ms=min(samples), max_ms=max(samples), runs=len(samples), peak_mib=peaks[name],
                         fused_vs_unfused_rel_err=errors.get(name.split("-", 1)[-1]) if "-" in name else None,
                         first_call_ms=first_call_ms[name], triton_vs_eager_scoring=diffs.get(name)))
    return rows


def format_table(rows: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}",
             f"{'dtype':5} {'batch':>5} {'point':24} {'median ms':>10} {'ratio':>7} {'paired':>7} {'peak MiB':>9} "
             f"{'rel err':>8} {'1st ms':>8} {'vs graph':>8} {'paired':>7}"]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        err = "-" if r["fused_vs_unfused_rel_err"] is None else f"{r['fused_vs_unfused_rel_err']:.1e}"
        lines.append(f"{r['dtype']:5} {r['batch']:>5} {r['point']:24} {r['median_ms']:>10.3f} "
                     f"{r['ratio']:>7.4f} {r['paired_ratio']:>7.4f} {peak:>9} {err:>8} "
                     f"{r.get('first_call_ms', float('nan')):>8.0f} "
                     + ("" if r.get("ratio_vs_graph_baseline") is None else
                        f"{r['ratio_vs_graph_baseline']:>8.4f} {r['paired_ratio_vs_graph_baseline']:>7.4f}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config.set(target_programs=args.target_programs, num_warps=args.num_warps)
    model, trunk, embed, logit_scale, image_size = build_model(args)
    readout = from_model(model)
    variants = usable_variants(args, device)
    env = environment(device)
    print(f"{env} head_path={readout.head_path} variants={variants}", flush=True)
    sweep = kernel_sweep(trunk, args.kernel_sweep, device, args.sweep_configs) if args.kernel_sweep else None
    tuned = tune_from_sweep(sweep) if sweep else None
    rows = []
    for dtype_name in args.dtypes:
        for batch in args.batches:
            rows += measure_point(args, (embed, logit_scale, image_size), readout, dtype_name, batch, device, variants)
            print(format_table([r for r in rows if (r["dtype"], r["batch"]) == (dtype_name, batch)],
                               env.get("gpu", env.get("cpu"))), flush=True)
    print("\n" + format_table(rows, env.get("gpu", env.get("cpu"))))
    if args.out:
        write_json_atomic(args.out, dict(environment=env, args=vars(args), rows=rows, kernel_sweep=sweep, tuned=tuned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
