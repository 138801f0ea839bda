"""The product path users call: ``DoLaSigLIP.score_pixels`` vs plain open_clip ``encode_image`` + softmax, one run.

Random-init open_clip ViT-L-16-SigLIP-384 (``--model``), every LayerNorm given a random affine first (random
init leaves gamma = 1, beta = 0), bf16 autocast over fp32 weights, a [1000, D] bank. Per batch, interleaved
round by round, each call timed with ``torch.cuda.synchronize()`` (wall time, as a user sees it):

- ``plain``: ``softmax(normalize(encode_image(x)) @ bank_n.T / tau)``, eager; ``plain-graph``: the same captured
  as one CUDA graph (the fairest batch-1 baseline);
- ``off``, ``static``, ``dynamic3/8/23``: ``DoLaSigLIP(mode, layers).score_pixels(x, bank)`` eager, and each
  ``...-graph`` with ``cuda_graphs=True`` (readout + scoring replayed as one graph);
- ``reload``: every LayerNorm's affine changed IN PLACE after the scorer's first call (trained-like values,
  gamma ~ N(0.8, 0.7), beta ~ N(0, 0.2)), then ``dynamic23`` eager and graphed again.

Ratios: eager points vs ``plain``, graph points vs ``plain-graph`` (median of per-round ratios, and of medians).
``plain-again`` / ``plain-again-graph`` time the baseline a second time in the same rounds: a ratio closer to 1 than
theirs is within the run's noise.
Prints the readout's path record (``Readout.layer_paths``) per point. One command:

    python benchmarks/product.py --out benchmarks/results/h200_product.json
    python benchmarks/product.py --device cpu --quick       # smoke run: tiny timm tower, CPU
"""
from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import siglip_dola
from siglip_dola import config
from siglip_dola.io import write_json_atomic
from siglip_dola.readout import cuda_graphs, stacking_tuner

from benchenv import environment   # benchmarks/benchenv.py: commit, versions, GPU, command
from norms import randomize_norms   # benchmarks/norms.py: trained-like LayerNorm affines

TARGETS = {  # (point, batch) -> the most its ratio may be
    ("dynamic3-graph", 1): 1.02, ("dynamic23-graph", 1): 1.05, ("dynamic3", 1): 1.10,
    ("dynamic3", 64): 1.005, ("dynamic23", 64): 1.02,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-L-16-SigLIP-384", help="open_clip model name (random init)")
    parser.add_argument("--quick", action="store_true", help="tiny timm tower (CPU smoke run)")
    parser.add_argument("--batches", default="1,8,64,256", help="comma list")
    parser.add_argument("--runs", type=int, default=15, help="timed rounds per batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--stacked-max-batch", type=int, default=8,
                        help="at batches <= this, also time dynamic3/8/23 with the other stacked-pooling setting "
                             "than the default (config stacked_max_batch), in the same rounds; 0: not")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.runs < 1 or args.warmup < 1 or min(args.batches) < 1:
        parser.error("--runs, --warmup and --batches must be >= 1")
    return args


def build(args, device):
    """(loaded, plain encode_image function, the module) with random init and random LayerNorm affines."""
    if args.quick:
        import timm
        tower = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=12,
                                  embed_dim=128, num_heads=4, img_size=64).eval().to(device)
        randomize_norms(tower)
        return siglip_dola.from_model(tower, logit_scale=4.6, precision="bf16"), tower, tower
    import open_clip
    model = open_clip.create_model(args.model, pretrained=None, device=device).eval()
    randomize_norms(model)
    loaded = siglip_dola.from_model(model, precision="bf16", logit_scale=float(model.logit_scale))
    return loaded, model.encode_image, model


def layer_sets(num_layers: int) -> dict[str, dict]:
    """point name -> DoLaSigLIP settings: off, static (one layer), dynamic over 3 / 8 / 23 candidate layers."""
    evens = list(range(2, num_layers, 2))
    return {"off": dict(mode="off"), "static": dict(mode="static"),
            "dynamic3": dict(mode="dynamic", layers=evens[-3:]),
            "dynamic8": dict(mode="dynamic", layers=evens[-8:]),
            "dynamic23": dict(mode="dynamic", layers=list(range(1, num_layers)))}


def other_pooling(batch: int, args, graph: bool) -> list[tuple[str, dict]]:
    """[(point suffix, config options)] of the stacked-pooling settings beside the default for this batch and kind
    of call: eager batches the tuner decides (readout/stacking_tuner.py) get both, stacked and per layer; otherwise
    the one that is NOT the default (eager: config stacked_max_batch; graphed: stacked_max_batch_graphed); none past
    --stacked-max-batch."""
    if batch > args.stacked_max_batch:
        return []
    tuned = (not graph and args.device.startswith("cuda") and config.get("stacked_tuning")
             and not config.is_set("stacked_max_batch") and stacking_tuner.MIN_BATCH <= batch <= stacking_tuner.MAX_BATCH)
    if tuned:
        return [("-stacked", dict(stacked_max_batch=batch)), ("-perlayer", dict(stacked_max_batch=0))]
    stacked_by_default = (batch <= config.get("stacked_max_batch_graphed" if graph else "stacked_max_batch")
                          and (args.device.startswith("cuda") or config.get("stacked_on_cpu")))
    limit = 0 if stacked_by_default else args.stacked_max_batch
    return [("-perlayer" if stacked_by_default else "-stacked", dict(stacked_max_batch=limit,
                                                                      stacked_max_batch_graphed=limit))]


def plain_call(encode, bank_n, tau, dtype, device):
    def call(images):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
            z = encode(images)
        return torch.softmax(F.normalize(z.float(), dim=-1) @ bank_n.T / tau, dim=-1)   # (B, C)
    return call


def plain_graph(call, images, dtype, device):
    with torch.autocast(device.type, dtype=dtype):
        graphed = cuda_graphs.capture_call(call, images)

    def replay(x):
        with torch.autocast(device.type, dtype=dtype):   # a graph replays under the autocast of its capture
            return graphed(x)
    return replay


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, images, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn(images)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def path_summary(readout) -> str:
    counts = collections.Counter(readout.layer_paths.values())
    return ", ".join(f"{path} x{n}" for path, n in sorted(counts.items())) or "-"


def measure_batch(args, loaded, encode, module, batch, bank, device) -> list[dict]:
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, *loaded.readout.image_size, generator=generator).to(device)
    bank_n = F.normalize(bank, dim=-1)
    graphs = device.type == "cuda"
    points = {"plain": plain_call(encode, bank_n, loaded.tau, loaded.dtype, device)}
    points["plain-again"] = points["plain"]   # the baseline timed twice: its ratio is the run's noise floor
    if graphs:
        points["plain-graph"] = plain_graph(points["plain"], images, loaded.dtype, device)
        points["plain-again-graph"] = points["plain-graph"]
    paths, options = {}, {}   # options: point -> config options set around each of its calls (not timed)
    for name, settings in layer_sets(loaded.readout.num_layers).items():
        for graph in ([False, True] if graphs else [False]):
            others = other_pooling(batch, args, graph) if name.startswith("dynamic") else []
            for suffix, opts in [("", {})] + others:
                scorer = siglip_dola.DoLaSigLIP(loaded, cuda_graphs=graph, batch_size=batch, **settings)
                key = name + suffix + ("-graph" if graph else "")
                points[key], options[key] = (lambda x, s=scorer: s.score_pixels(x, bank)), opts
                with config.override(**opts):
                    points[key](images)                           # first call: compiles, captures
                paths[key] = path_summary(loaded.readout) if scorer.settings.layers else "-"
                if not graph and not suffix and name in ("off", "dynamic3", "dynamic23"):   # the readout alone
                    points[name + "-embed"] = lambda x, s=scorer: s.embed(x)
    times = run_rounds(points, images, args, device, options)
    # a reload: trained-like affines written in place after first use (the graphed scorer captures again)
    randomize_norms(module, trained_like=True, seed=2)
    reload = {"plain": points["plain"], "reload-dynamic23": points["dynamic23"]}
    if graphs:
        reload.update({"plain-graph": points["plain-graph"], "reload-dynamic23-graph": points["dynamic23-graph"]})
    for key in [k for k in reload if k.startswith("reload")]:
        reload[key](images)
        paths[key] = path_summary(loaded.readout)
    times.update({k: v for k, v in run_rounds(reload, images, args, device).items() if k.startswith("reload")})
    randomize_norms(module, seed=1)   # back to the first affines for the next batch
    rows = []
    for name, samples in times.items():
        base = "plain-graph" if name.endswith("-graph") else "plain"   # -embed: vs the plain call incl. softmax
        paired = statistics.median(t / b for t, b in zip(samples, times[base]))
        rows.append(dict(batch=batch, point=name, median_ms=statistics.median(samples), baseline=base,
                         ratio=statistics.median(samples) / statistics.median(times[base]), paired_ratio=paired,
                         target=TARGETS.get((name, batch)), paths=paths.get(name, "-"), runs=len(samples)))
    del points, reload
    gc.collect()
    if graphs:
        torch.cuda.empty_cache()
    return rows


def run_rounds(points: dict, images, args, device, options: dict | None = None) -> dict[str, list[float]]:
    options = options or {}
    for name, fn in points.items():
        with config.override(**options.get(name, {})):
            for _ in range(args.warmup):
                fn(images)
    times = {name: [] for name in points}
    rounds = args.runs * (4 if images.shape[0] <= 8 else 1)   # CPU-bound small batches are noisier, and cheap
    for _ in range(rounds):         # interleaved: slow drift hits every point alike
        for name, fn in points.items():
            with config.override(**options.get(name, {})):   # set before the clock starts
                times[name].append(timed(fn, images, device))
    return times


def format_table(rows: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}; eager points vs plain open_clip eager, -graph points vs plain graphed",
             f"{'batch':>5} {'point':24} {'median ms':>10} {'ratio':>7} {'paired':>7} {'target':>7}  paths"]
    for r in rows:
        target = "" if r["target"] is None else (f"<={r['target']}" + (" ok" if r["paired_ratio"] <= r["target"] else " MISS"))
        lines.append(f"{r['batch']:>5} {r['point']:24} {r['median_ms']:>10.3f} {r['ratio']:>7.4f} "
                     f"{r['paired_ratio']:>7.4f} {target:>10}  {r['paths']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded, encode, module = build(args, device)
    bank = torch.randn(args.classes, loaded.readout.embed_dim, generator=torch.Generator().manual_seed(5)).to(device)
    env = environment(device)
    print(env, flush=True)
    rows = []
    for batch in args.batches:
        batch_rows = measure_batch(args, loaded, encode, module, batch, bank, device)
        print(format_table(batch_rows, env.get("gpu", "cpu")), flush=True)
        rows += batch_rows
    print("\n" + format_table(rows, env.get("gpu", "cpu")))
    if args.out:
        write_json_atomic(args.out, dict(environment=env, args=vars(args), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
