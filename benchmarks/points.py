"""Timed callables for benchmarks/overhead.py (one per table row) and per-point probes (memory, errors, GPU time)."""
from __future__ import annotations

import time

import torch

from siglip_dola import config, scoring
from siglip_dola.readout import cuda_graphs
from variants import fused_config

def sleeping(fn, milliseconds: float):
    def run():
        result = fn()
        time.sleep(milliseconds / 1e3)
        return result
    return run


def make_points(embed, readout, images, bank, tau, sets, variants, split=False, eager_scoring=False,
                cpu_slack_ms=0.0, graphs=False):
    """name -> zero-argument callable doing one full scoring pass (baseline first); '-es': eager scoring."""
    def baseline():
        return scoring.build_probs_from_rep(embed(images), bank, tau)

    def dola(layers, variant, score=True, triton_score=True):
        def run():
            with fused_config(variant):
                z_final, z_layers = readout(images, layers)
            if not score:
                return z_layers
            with config.override(triton_scoring=triton_score):
                return scoring.score(z_final, z_layers, bank, tau, layers, mode="dynamic")
        return run

    def graphed_baseline():
        state = {}
        def run():   # captured on the first call, inside the caller's autocast
            if "call" not in state:
                state["call"] = cuda_graphs.capture_call(embed, images)
            return scoring.build_probs_from_rep(state["call"](images), bank, tau)
        return run

    def graphed_dola(layers, variant, score=True):
        state = {}
        def run():
            if "call" not in state:
                with fused_config(variant):
                    state["call"] = cuda_graphs.capture(readout, images, layers)
            z_final, z_layers = state["call"](images)
            return scoring.score(z_final, z_layers, bank, tau, layers, mode="dynamic") if score else z_layers
        return run

    points = {"baseline": baseline, "baseline-again": baseline}  # the second one shows the timing noise
    if graphs:
        points["baseline-graph"] = graphed_baseline()
    if split:  # the model's forward alone: baseline - forward = the baseline's own scoring
        points["forward"] = lambda: embed(images)
    for count, layers in sets.items():
        for variant in variants:
            points[f"dola{count}-{variant}"] = dola(layers, variant)
            if eager_scoring:
                points[f"dola{count}-{variant}-es"] = dola(layers, variant, triton_score=False)
            if split:  # the readout alone (no scoring.score), to split the cost
                points[f"readout{count}-{variant}"] = dola(layers, variant, score=False)
            if graphs:  # the readout replayed as a CUDA graph (readout.cuda_graphs), scoring as usual
                points[f"dola{count}-{variant}-graph"] = graphed_dola(layers, variant)
            if cpu_slack_ms:  # the readout, then the CPU idles: unchanged time = the GPU was still busy
                points[f"readout{count}-{variant}+sleep"] = sleeping(dola(layers, variant, score=False), cpu_slack_ms)
    return points


def first_call(fn, device: torch.device) -> float:
    """Wall milliseconds of one call, synchronised (includes Triton compiles and graph captures)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def scoring_diffs(points: dict) -> dict[str, dict]:
    """'-es' point -> max |its result - the default path's| of probs and jsd, share of equal layers."""
    diffs = {}
    for name in [n for n in points if n.endswith("-es")]:
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
    for variant in variants:
        with fused_config(variant):
            _, got = readout(images, layers)
        errors[variant] = float(((got.float() - reference.float()).norm(dim=-1) / reference.float().norm(dim=-1)).max())
    return errors
