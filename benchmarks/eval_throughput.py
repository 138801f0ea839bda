"""End-to-end evaluation throughput: `siglip-dola eval` on JPEG files vs the forward alone and a clip_benchmark loop.

One run, one GPU, one process (plus the CLI run as a subprocess):
1. writes N synthetic 500x375 JPEGs (quality 90, ImageNet-like size) in an ImageFolder of C classes;
2. builds ViT-L-16-SigLIP-384 (open_clip, random init, every LayerNorm given a random affine) and saves it as a
   local open_clip folder (open_clip_config.json + open_clip_model.safetensors + an offline word-level
   tokenizer) that `siglip_dola.load()` reads with no network;
3. times, in images/s, all with the same batch size, bf16 autocast and preprocessing:
   (a) forward only on preloaded GPU tensors: the readout eval runs (final + layers 1..N-1), and plain
       open_clip `encode_image` for reference;
   (b) a clip_benchmark-style loop: torchvision ImageFolder + the model's preprocess, a torch DataLoader with
       workers, `encode_image`, normalise, logits against the class bank, results to the CPU;
   (c) `evaluate()` from the folder, the library call `siglip-dola eval` makes (model load excluded; dataset
       listing, the text bank, every layer's embeddings, scoring and the JSON write included);
   (d) `python -m siglip_dola eval ...` as a subprocess: wall clock with start-up and model load;
   and eval's embedding loop alone (embed_images, all layers) at two worker counts, to split (c);
4. checks that eval's image embeddings equal `encode_image` on the same files (cosine).
(b) and (c) are interleaved for `--rounds` rounds; medians are reported. Nothing is asserted.

    python benchmarks/eval_throughput.py --out benchmarks/results/h200_eval_throughput.json
CPU smoke test: python benchmarks/eval_throughput.py --device cpu --model-name ViT-B-16-SigLIP --n 96 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from eval_inputs import IMAGE_SIZE, TEMPLATE, write_image_folder, write_model_folder  # noqa: E402  (the JPEGs, the model)
from stages import stage_seconds  # noqa: E402

# ---------------------------------------------------------------- timings
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(loaded, batch_size: int, iters: int) -> dict:
    """(a) images/s of the eval readout (all layers) and of encode_image on preloaded device tensors."""
    from siglip_dola.loading import autocast

    device, layers = loaded.device, list(range(1, loaded.readout.num_layers))
    size = loaded.readout.image_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(batch_size, 3, *size, generator=generator).to(device) for _ in range(3)]
    calls = {"readout_all_layers": lambda x: loaded.readout(x, layers=layers),
             "encode_image": lambda x: loaded.model.encode_image(x)}
    rates = {}
    for name, call in calls.items():
        with torch.inference_mode(), autocast(device, loaded.dtype):
            for i in range(3):
                call(inputs[i % 3])
            _sync(device)
            start = time.perf_counter()
            for i in range(iters):
                call(inputs[i % 3])
            _sync(device)
        rates[name] = batch_size * iters / (time.perf_counter() - start)
    return rates


def clip_benchmark_loop(loaded, root: Path, bank: torch.Tensor, batch_size: int, workers: int) -> tuple[float, torch.Tensor]:
    """(b) clip_benchmark's zero-shot loop over the folder: (images/s, image features [n, D] fp32 cpu)."""
    import torch.nn.functional as F
    from torchvision.datasets import ImageFolder

    from siglip_dola.loading import autocast

    device = loaded.device
    start = time.perf_counter()
    dataset = ImageFolder(str(root), transform=loaded.preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    classifier = bank.to(device).T  # (D, C)
    features, logits = [], []
    for images, _ in loader:
        images = images.to(device)
        with torch.no_grad(), autocast(device, loaded.dtype):
            image_features = F.normalize(loaded.model.encode_image(images), dim=-1)
            logits.append((100.0 * image_features @ classifier).float().cpu())
        features.append(image_features.float().cpu())
    return len(dataset) / (time.perf_counter() - start), torch.cat(features)


def eval_library(loaded, root: Path, out: Path, batch_size: int, workers: int | None,
                 n: int | None = None) -> tuple[float, dict]:
    """(c) images/s of evaluate() on the folder (what `siglip-dola eval` calls after loading the model)."""
    from siglip_dola.evaluation.evaluate import evaluate

    start = time.perf_counter()
    report = evaluate(loaded, str(root), out=out, batch_size=batch_size, progress=False, workers=workers, n=n)
    return report["n_images"] / (time.perf_counter() - start), report


EVAL_STAGES = ("embed_dataset", "embed_images", "class_logits", "build_text_bank", "score_modes", "layer_lens",
               "classification_metrics", "assemble_report", "write_json_atomic", "evaluate")


def eval_stages(loaded, root: Path, out: Path, batch_size: int, workers: int | None) -> dict:
    """Seconds inside each stage of one evaluate() (cProfile, stages.py: shares, the profiler inflates the loop)."""
    from siglip_dola.evaluation.evaluate import evaluate

    return stage_seconds(lambda: evaluate(loaded, str(root), out=out, batch_size=batch_size, progress=False,
                                          workers=workers), EVAL_STAGES)


def embedding_loop(loaded, root: Path, batch_size: int, workers: int | None) -> float:
    """images/s of eval's embedding pass alone (embed_images, all layers), to split (c) into loop and scoring."""
    from siglip_dola.data.datasets import load_dataset
    from siglip_dola.embedding.images import embed_images

    start = time.perf_counter()
    items = load_dataset(str(root)).items
    layers = list(range(1, loaded.readout.num_layers))
    embeddings = embed_images(loaded, items, layers, batch_size=batch_size, progress=False, workers=workers)
    return len(embeddings.ids) / (time.perf_counter() - start)


def eval_cli(model_dir: Path, root: Path, out: Path, batch_size: int, device: str, precision: str) -> dict:
    """(d) `python -m siglip_dola eval` in a fresh process: wall clock including start-up and model load."""
    command = [sys.executable, "-m", "siglip_dola", "eval", "--model", str(model_dir), "--dataset", str(root),
               "--out", str(out), "--batch-size", str(batch_size), "--precision", precision, "--device", device,
               "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - start
    n = json.loads(out.read_text())["n_images"] if proc.returncode == 0 else 0
    return {"returncode": proc.returncode, "wall_s": wall, "images_per_s_incl_startup": n / wall,
            "stdout_tail": proc.stdout[-400:], "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}


def embedding_check(loaded, root: Path, features: torch.Tensor, k: int) -> dict:
    """eval's loop vs clip_benchmark's encode_image on the first k files: min cosine and max relative error."""
    import torch.nn.functional as F
    from torchvision.datasets import ImageFolder

    from siglip_dola.embedding.images import embed_images

    paths = [path for path, _ in ImageFolder(str(root)).samples[:k]]
    ours = F.normalize(embed_images(loaded, paths, [], batch_size=min(k, 64), progress=False).z_final, dim=-1)
    theirs = features[:k]
    return {"n": k, "min_cosine": float((ours * theirs).sum(-1).min()),
            "max_rel_err": float(((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max())}


# ---------------------------------------------------------------- main
def _environment(device, commit: str | None) -> dict:
    import open_clip
    import torchvision

    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:  # no git where the benchmark runs
            commit = None
    return {"commit": commit or None, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def _guarded(errors: dict, name: str, fn, *args, **kwargs):
    """fn(*args) or None, the error recorded: one failing phase must not lose the rest of a device run."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported in the JSON
        errors[name] = f"{type(err).__name__}: {err}"
        print(f"{name} failed: {errors[name]}", flush=True)
        return None


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="ViT-L-16-SigLIP-384")
    parser.add_argument("--n", type=int, default=6400, help="JPEG files (default 6400: 100 full batches of 64)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decode workers for eval (default: its own default)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (b) and (c)")
    parser.add_argument("--forward-iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--work-dir", default="/tmp/sdola_eval_throughput")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--loop-workers", type=lambda t: [int(v) for v in t.split(",") if v], default=None,
                        help="worker counts for the loop-alone timing, e.g. 7,15; '' for none (default: eval's and half)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse HEAD)")
    return parser


def run(args) -> dict:
    """Every phase of the module docstring; a dict of rates, ratios, checks and errors."""
    from siglip_dola.embedding.pixel_batches import default_workers
    from siglip_dola.loading import load
    from siglip_dola.text_bank.build import build_text_bank

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    work = Path(args.work_dir)
    root, model_dir = work / "images", work / "model"
    t0 = time.perf_counter()
    classnames = write_image_folder(root, args.n, args.classes)
    t1 = time.perf_counter()
    write_model_folder(model_dir, args.model_name, classnames)
    t2 = time.perf_counter()
    loaded = load(str(model_dir), device=device, precision=precision)
    t3 = time.perf_counter()
    workers = default_workers(args.n, args.batch_size) if args.workers is None else args.workers
    print(f"setup: {args.n} JPEGs {t1 - t0:.1f}s, model folder {t2 - t1:.1f}s, load() {t3 - t2:.1f}s; "
          f"decode workers {workers}", flush=True)
    errors: dict = {}
    forward = _guarded(errors, "forward", forward_only, loaded, args.batch_size, args.forward_iters) or {}
    print(f"(a) forward only: {forward}", flush=True)
    bank = build_text_bank(loaded, classnames, (TEMPLATE,)).embeds
    _guarded(errors, "warmup", eval_library, loaded, root, work / "warmup.json", args.batch_size, args.workers,
             n=4 * args.batch_size)  # cuBLAS / Triton set-up outside the timings
    clip_rates, eval_rates, features, report = [], [], None, None
    for _ in range(args.rounds):
        clip = _guarded(errors, "clip_benchmark_loop", clip_benchmark_loop, loaded, root, bank, args.batch_size, workers)
        if clip is not None:
            clip_rates.append(clip[0])
            features = clip[1]
        evaluated = _guarded(errors, "eval", eval_library, loaded, root, work / "eval.json", args.batch_size, args.workers)
        if evaluated is not None:
            eval_rates.append(evaluated[0])
            report = evaluated[1]
        print(f"(b) clip_benchmark loop {clip_rates[-1:]} img/s   (c) eval {eval_rates[-1:]} img/s", flush=True)
    loop = {f"workers={w}": _guarded(errors, f"loop_workers_{w}", embedding_loop, loaded, root, args.batch_size, w)
            for w in dict.fromkeys((workers, max(1, workers // 2)) if args.loop_workers is None
                                                   else args.loop_workers)}
    print(f"eval's embedding loop alone: {loop}", flush=True)
    stages = _guarded(errors, "stages", eval_stages, loaded, root, work / "stages.json", args.batch_size, workers)
    print(f"eval's stages (cProfile): {stages}", flush=True)
    check = None if features is None else _guarded(errors, "check", embedding_check, loaded, root, features,
                                                   min(256, args.n))
    cli = None if args.skip_cli else _guarded(errors, "cli", eval_cli, model_dir, root, work / "cli.json",
                                              args.batch_size, args.device, precision)
    eval_rate = statistics.median(eval_rates) if eval_rates else None
    clip_rate = statistics.median(clip_rates) if clip_rates else None
    readout_rate, encode_rate = forward.get("readout_all_layers"), forward.get("encode_image")
    return {
        "benchmark": "eval_throughput", **_environment(device, args.commit),
        "model": f"{args.model_name} (open_clip, random init, random LayerNorm affines), {precision} autocast",
        "images": {"n": args.n, "size": list(IMAGE_SIZE), "format": "JPEG q90, synthetic", "classes": args.classes},
        "batch_size": args.batch_size, "decode_workers": workers, "layers_read": loaded.readout.num_layers - 1,
        "setup_s": {"write_jpegs": t1 - t0, "write_model_folder": t2 - t1, "load": t3 - t2},
        "images_per_s": {"a_forward_readout_all_layers": readout_rate, "a_forward_encode_image": encode_rate,
                         "b_clip_benchmark_loop": clip_rate, "c_eval": eval_rate},
        "rounds": {"b_clip_benchmark_loop": clip_rates, "c_eval": eval_rates},
        "embedding_loop_alone_images_per_s": loop,
        "eval_stages_s_cprofile": stages,
        "ratios": {"eval_vs_forward_readout": _ratio(eval_rate, readout_rate),
                   "eval_vs_forward_encode_image": _ratio(eval_rate, encode_rate),
                   "eval_vs_clip_benchmark": _ratio(eval_rate, clip_rate)},
        "embedding_check": check, "cli": cli,
        "eval_n_images": None if report is None else report["n_images"],
        "eval_skipped": None if report is None else len(report["skipped"]), "errors": errors,
    }


def _print_table(result: dict) -> None:
    print(f"\n{result['gpu'] or 'cpu'}: {result['model']}, batch {result['batch_size']}, "
          f"{result['decode_workers']} decode workers, {result['images']['n']} JPEGs 500x375")
    for key, value in {**result["images_per_s"], **{f"loop alone, {k}": v for k, v in
                                                      result["embedding_loop_alone_images_per_s"].items()}}.items():
        print(f"  {key:<34} {'failed' if value is None else f'{value:9.1f} img/s'}")
    for key, value in result["ratios"].items():
        print(f"  {key:<34} {'-' if value is None else f'{value:9.3f}'}")
    cli = result["cli"]
    if cli:
        print(f"  CLI wall {cli['wall_s']:.1f}s (rc {cli['returncode']}), {cli['images_per_s_incl_startup']:.1f} img/s "
              "including start-up and model load")


def main() -> None:
    args = _parser().parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    _print_table(result)


if __name__ == "__main__":
    main()
