"""Cost of DoLa over the plain SigLIP forward, all ratios from one process and one run.

Baseline: the model's own embedding path (open_clip ``encode_image``; a timm tower's forward in
``--quick``) plus scoring against an ImageNet-1k-sized text bank [1000, D]. DoLa: ``readout(images,
layers)`` (same forward, layer readout) plus ``runtime.score`` (dynamic). Variants of the readout:
``unfused`` (folded head per layer in PyTorch), ``onepass`` (Triton one-pass pooling, all tails batched;
the library default on CUDA), ``onepass-stream`` (the same on a side CUDA stream). Timings are medians
of ``--runs`` runs after warm-up, CUDA events on GPU; the variants are interleaved run by run.

    python benchmarks/overhead.py --device cpu --quick                    # ~1 min on 2 CPU cores
    python benchmarks/overhead.py --batches 64 --dtypes bf16 --layers 3,23 --out overhead.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from siglip_dola import runtime
from siglip_dola.io import write_json_atomic
from siglip_dola.readout import from_model, fused, graphed, map_head

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
VARIANTS = {  # name -> fields of fused.FUSED set for that variant ("onepass-tuned": filled by --kernel-sweep)
    "unfused": dict(enabled=False, side_stream=False),
    "onepass": dict(enabled=True, side_stream=False),
    "onepass-stream": dict(enabled=True, side_stream=True),
    "onepass-tuned": dict(enabled=True, side_stream=False),
    "onepass-x1": dict(enabled=True, side_stream=False, target_programs=-1),   # -1: 1 x SMs (set at start)
    "readfloor": dict(enabled=True, side_stream=False),       # floors: see FLOORS
    "readonly": dict(enabled=True, side_stream=False),
    "readonly-flat": dict(enabled=True, side_stream=False),
}
SWEEP_WARPS, SWEEP_BLOCK_T, SWEEP_STAGES = (8, 16, 32), (16, 32), (1, 2, 3)
SWEEP_TARGETS = (1, 2, 4, 8)   # x the number of SMs: grid = (B, token splits)


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
    parser.add_argument("--fused-scoring", action="store_true",
                        help="also time each DoLa point with runtime.score(..., fused=True) (torch.compile), '-fs'")
    parser.add_argument("--eager-scoring", action="store_true",
                        help="also time each DoLa point with runtime.TRITON_SCORING off (eager PyTorch scoring), '-es'")
    parser.add_argument("--cpu-slack", type=float, default=0.0, metavar="MS",
                        help="also time each readout followed by MS ms of CPU sleep: shows whether the CPU runs ahead")
    parser.add_argument("--graphs", action="store_true",
                        help="also time baseline and DoLa with the forward replayed as a CUDA graph (readout.graphed)")
    parser.add_argument("--gpu-busy", action="store_true",
                        help="profile one call per point: GPU kernel time, span and kernel count (CUDA)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table (CUDA)")
    parser.add_argument("--kernel-sweep", type=int, default=0, metavar="B",
                        help="first time the Triton kernel alone at batch B over launch configs (CUDA)")
    parser.add_argument("--sweep-configs", default=None, metavar="W:BT:ST:K,...",
                        help="kernel-sweep only these warps:block_t:stages:programs-per-SM (default: the full grid)")
    parser.add_argument("--target-programs", type=int, default=0, help="fused kernel grid target (0: 2 x SMs)")
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
    size = model.visual.trunk.patch_embed.img_size
    return model, model.visual.trunk, model.encode_image, float(model.logit_scale.detach()), tuple(size)


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


def _read_floor_launch(pooler, slot, tokens):
    """'readfloor': read every captured layer once (tokens.sum()), nothing else: the cost no kernel beats.

    Its z_layers are meaningless (the partials stay unwritten); only its time is reported."""
    pooler._out[slot].view(-1)[0] = tokens.sum()


if fused.triton is not None:
    tl = fused.tl

    @fused.triton.jit
    def _flat_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        """Sum one contiguous chunk of BLOCK * STEPS elements per program: a plain streaming read."""
        start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
        acc = tl.zeros([BLOCK], tl.float32)
        for step in range(STEPS):
            offs = start + step * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _flat_read_launch(pooler, slot, tokens):
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
    launch, result = fused.LayerPooler._launch, fused.LayerPooler.result
    for name, value in fields.items():
        setattr(fused.FUSED, name, value)
    if variant in FLOORS:
        fused.LayerPooler._launch = FLOORS[variant][0]
        fused.LayerPooler.result = FLOORS[variant][1] or result
    try:
        yield
    finally:
        fused.LayerPooler._launch, fused.LayerPooler.result = launch, result
        for name, value in saved.items():
            setattr(fused.FUSED, name, value)


def usable_variants(args, device: torch.device) -> list[str]:
    fast = device.type == "cuda" and fused.triton is not None
    names = args.variants.split(",") if args.variants else (["unfused", "onepass", "onepass-stream"] if fast else ["unfused"])
    bad = [n for n in names if n not in VARIANTS or (n != "unfused" and not fast)]
    if bad:
        raise SystemExit(f"--variants {bad} unusable here (fused needs CUDA + triton); valid: {list(VARIANTS)}")
    if "onepass-x1" in names:
        VARIANTS["onepass-x1"]["target_programs"] = torch.cuda.get_device_properties(device).multi_processor_count
    if "onepass-tuned" in names and not args.kernel_sweep:
        raise SystemExit("--variants onepass-tuned needs --kernel-sweep B (it takes the fastest swept config)")
    return names


def sleeping(fn, milliseconds: float):
    def run():
        result = fn()
        time.sleep(milliseconds / 1e3)
        return result
    return run


def make_points(embed, readout, images, bank, tau, sets, variants, split=False, fused_scoring=False,
                eager_scoring=False, cpu_slack_ms=0.0, graphs=False):
    """name -> zero-argument callable doing one full scoring pass (baseline first); '-fs': fused scoring."""
    def baseline():
        return runtime.build_probs_from_rep(embed(images), bank, tau)

    def dola(layers, variant, score=True, fused_score=False, triton_score=True):
        def run():
            with fused_config(variant):
                z_final, z_layers = readout(images, layers)
            if not score:
                return z_layers
            saved, runtime.TRITON_SCORING = runtime.TRITON_SCORING, triton_score
            try:
                return runtime.score(z_final, z_layers, bank, tau, layers, mode="dynamic", fused=fused_score)
            finally:
                runtime.TRITON_SCORING = saved
        return run

    def graphed_baseline():
        state = {}
        def run():   # captured on the first call, inside the caller's autocast
            if "call" not in state:
                state["call"] = graphed.capture_call(embed, images)
            return runtime.build_probs_from_rep(state["call"](images), bank, tau)
        return run

    def graphed_dola(layers, variant, score=True):
        state = {}
        def run():
            if "call" not in state:
                with fused_config(variant):
                    state["call"] = graphed.capture(readout, images, layers)
            z_final, z_layers = state["call"](images)
            return runtime.score(z_final, z_layers, bank, tau, layers, mode="dynamic") if score else z_layers
        return run

    points = {"baseline": baseline, "baseline-again": baseline}  # the second one shows the timing noise
    if graphs:
        points["baseline-graph"] = graphed_baseline()
    if split:  # the model's forward alone: baseline - forward = the baseline's own scoring
        points["forward"] = lambda: embed(images)
    for count, layers in sets.items():
        for variant in variants:
            if variant.startswith("readonly"):   # no head tail, so nothing to score: the readout point only
                points[f"readout{count}-{variant}"] = dola(layers, variant, score=False)
                if graphs:
                    points[f"readout{count}-{variant}-graph"] = graphed_dola(layers, variant, score=False)
                continue
            points[f"dola{count}-{variant}"] = dola(layers, variant)
            if fused_scoring:
                points[f"dola{count}-{variant}-fs"] = dola(layers, variant, fused_score=True)
            if eager_scoring:
                points[f"dola{count}-{variant}-es"] = dola(layers, variant, triton_score=False)
            if split:  # the readout alone (no runtime.score), to split the cost
                points[f"readout{count}-{variant}"] = dola(layers, variant, score=False)
            if graphs:  # the readout replayed as a CUDA graph (readout.graphed), scoring as usual
                points[f"dola{count}-{variant}-graph"] = graphed_dola(layers, variant)
            if cpu_slack_ms:  # the readout, then the CPU idles: unchanged time = the GPU was still busy
                points[f"readout{count}-{variant}+sleep"] = sleeping(dola(layers, variant, score=False), cpu_slack_ms)
    return points


def first_call(fn, device: torch.device) -> float:
    """Wall milliseconds of one call, synchronised: for '-fs' points the first one includes the compile."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def fused_scoring_diffs(points: dict) -> dict[str, dict]:
    """'-fs' / '-es' point -> max |its result - the default path's| of probs and jsd, share of equal layers."""
    diffs = {}
    for name in [n for n in points if n.endswith(("-fs", "-es"))]:
        fused_result, eager_result = points[name](), points[name[:-3]]()
        diffs[name] = dict(
            probs_max_abs=float((fused_result.probs - eager_result.probs).abs().max()),
            jsd_max_abs=float((fused_result.jsd - eager_result.jsd).abs().max()),
            same_layer=float((fused_result.premature_layer == eager_result.premature_layer).float().mean()))
    return diffs


def profile(points: dict, names: list[str]) -> None:
    """Print the top GPU kernels and the CPU total of one run of each named point."""
    for name in names:
        with torch.profiler.profile() as prof:
            points[name]()
            torch.cuda.synchronize()
        print(f"--- profile {name}")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


def gpu_busy(points: dict) -> dict[str, dict]:
    """name -> GPU kernel time of one call (union of kernel intervals), its span and the kernel count."""
    result = {}
    for name, fn in points.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy_us, end = 0.0, float("-inf")
        for start, stop in spans:
            busy_us += max(0.0, stop - max(start, end))
            end = max(end, stop)
        result[name] = dict(kernel_ms=busy_us / 1e3, span_ms=(spans[-1][1] - spans[0][0]) / 1e3, kernels=len(spans))
        print(f"gpu busy {name}: {result[name]}", flush=True)
    return result


def peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def fused_errors(readout, images, layers, variants) -> dict[str, float]:
    """variant -> max over layers and images of |z - z_unfused| / |z_unfused|."""
    with fused_config("unfused"):
        _, reference = readout(images, layers)
    errors = {}
    for variant in [v for v in variants if not v.startswith("readonly")]:
        with fused_config(variant):
            _, got = readout(images, layers)
        errors[variant] = float(((got.float() - reference.float()).norm(dim=-1) / reference.float().norm(dim=-1)).max())
    return errors


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
        points = make_points(embed, readout, images, bank, tau, sets, variants, args.split, args.fused_scoring,
                             args.eager_scoring, args.cpu_slack, args.graphs)
        first_call_ms = {name: first_call(fn, device) for name, fn in points.items()}  # '-fs': includes compile
        for fn in points.values():
            for _ in range(args.warmup):
                fn()
        scoring_diffs = fused_scoring_diffs(points)
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
                         first_call_ms=first_call_ms[name], fused_vs_eager_scoring=scoring_diffs.get(name)))
    return rows


def environment(device: torch.device) -> dict:
    import open_clip
    import timm
    info = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                open_clip=open_clip.__version__, triton=getattr(fused.triton, "__version__", None),
                device=str(device), command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


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


def _kernel_runner(tokens, probe, eps, config: dict):
    """(run, read_pooled, splits) for one launch config of the pooling kernel on tokens (B, T, D)."""
    batch, num_tokens, dim = tokens.shape
    per_split, splits = fused.split_plan(batch, num_tokens, config["target_programs"], config["block_t"])
    out = torch.full((batch, probe.shape[0], splits, dim), float("nan"), device=tokens.device)   # poisoned
    lse = torch.full(out.shape[:-1], float("nan"), device=tokens.device)
    run = lambda: fused.pool_partials(tokens, probe, eps, out, lse, per_split, config["num_warps"],
                                      config["block_t"], config["num_stages"])
    return run, lambda: fused.combine_partials(out, lse), splits


def _sweep_configs(num_sms: int, spec: str | None) -> list[dict]:
    """Launch configs: the full grid, or ``spec`` = comma list of warps:block_t:stages:programs_per_SM."""
    grid = ([tuple(int(v) for v in item.split(":")) for item in spec.split(",")] if spec else
            [(w, t, s, k) for w in SWEEP_WARPS for t in SWEEP_BLOCK_T for s in SWEEP_STAGES for k in SWEEP_TARGETS])
    return [dict(num_warps=w, block_t=t, num_stages=s, target_programs=k * num_sms) for w, t, s, k in grid]


def _time_config(tokens, probe, eps, reference, config, timer) -> dict:
    row = dict(config)
    try:
        run, read, row["splits"] = _kernel_runner(tokens, probe, eps, config)
        for _ in range(3):
            run()
        row["ms"] = statistics.median(timer(run) for _ in range(30))
        row["combine_ms"] = statistics.median(timer(read) for _ in range(10))
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
    timer, rows = Timer(device), []
    configs = _sweep_configs(torch.cuda.get_device_properties(device).multi_processor_count, spec)
    for dtype in (torch.float32, torch.bfloat16):
        # the layout timm's residual stream has: (B, D, T) in memory, strides (T*D, 1, T)
        tokens = torch.randn(batch, trunk.embed_dim, num_tokens, device=device).mul(3).add(0.5).to(dtype).transpose(1, 2)
        reference = fused.pool_reference(tokens.double(), probe.double(), eps)
        copy_ms = statistics.median(timer(lambda: tokens.clone()) for _ in range(20))  # clone keeps the layout
        print(f"kernel B={batch} {dtype}: copy (read+write) {2 * tokens.nbytes / copy_ms / 1e6:.0f} GB/s", flush=True)
        if dtype == torch.bfloat16:  # under autocast timm's tokens are fp32: bf16 tokens only for the best configs
            configs = [{k: r[k] for k in configs[0]} for r in sorted(ok_rows(rows), key=lambda r: r["ms"])[:3]]
        for config in configs:
            row = dict(_time_config(tokens, probe, eps, reference, config, timer), dtype=str(dtype), copy_ms=copy_ms)
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
    args = parse_args(argv)
    device = torch.device(args.device)
    fused.FUSED.target_programs, fused.FUSED.num_warps = args.target_programs, args.num_warps
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
