"""Retrieval speed and size: query latency with/without DoLa rerank, index bytes per image, build throughput.

    python benchmarks/retrieval.py latency --sizes 10000 1000000      # synthetic D=1024, J=3 galleries (memory-mapped)
    python benchmarks/retrieval.py build --model embedded --n-images 128 --batch-size 32
    python benchmarks/retrieval.py build --model vit-l-random --n-images 8 --batch-size 8           # CPU
    python benchmarks/retrieval.py build --model vit-l-random --n-images 1024 --batch-size 64 --device cuda

Latency: one text query at a time (random unit vectors), medians / p90 over ``--queries`` queries after
``--warmup`` ones; "first stage" = FAISS top rerank-k and the softmax over it (mode off), "rerank" =
the same plus reading the J layers' rows from the memory map and DoLa (mode dynamic). Results print
as JSON lines (and go to ``--out``), each with the machine and its load average.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from siglip_dola.retrieval import RerankConfig, build_index, open_index, search_embedding
from siglip_dola.retrieval.from_vectors import build_index_from_vectors

D, LAYERS, NUM_LAYERS, LOGIT_SCALE = 1024, [18, 20, 22], 24, float(np.log(100.0))


def machine() -> dict:
    """Where the numbers came from (the load average says how busy the shared CPU was)."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def synthetic_chunks(n: int, chunk: int = 32768, seed: int = 0):
    """(paths, vectors [n_c, 1+J, D]) chunks: layer j = final + noise (closer to final for later layers)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        final = rng.standard_normal((size, D), dtype=np.float32)
        rows = [final] + [final + s * rng.standard_normal((size, D), dtype=np.float32) for s in (1.5, 1.0, 0.5)]
        yield [f"synthetic/{i:08d}.jpg" for i in range(start, start + size)], np.stack(rows, axis=1)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def time_queries(index, mode: str, rerank_k: int, queries: np.ndarray, warmup: int) -> dict:
    """Median / p90 milliseconds per query for one mode."""
    config = RerankConfig(top_k=10, rerank_k=rerank_k, mode=mode)
    times = []
    for number, text in enumerate(queries):
        start = time.perf_counter()
        search_embedding(index, text, config)
        if number >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


def latency(args) -> list[dict]:
    """Build (or reuse) a synthetic gallery per size and time first stage vs first stage + rerank."""
    rows = []
    for size in args.sizes:
        root = Path(args.workdir) / f"synthetic-{size}"
        if not (root / "manifest.json").is_file():
            start = time.perf_counter()
            build_index_from_vectors(root, synthetic_chunks(size), model_id="synthetic", layers=LAYERS,
                                     num_layers=NUM_LAYERS, logit_scale=LOGIT_SCALE)
            print(f"# wrote {root} in {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        index = open_index(root)
        open_s = time.perf_counter() - start
        queries = np.random.default_rng(1).standard_normal((args.queries + args.warmup, D)).astype(np.float32)
        for rerank_k in args.rerank_k:
            row = {"bench": "latency", "gallery": size, "D": D, "J": len(LAYERS), "rerank_k": rerank_k,
                   "open_s": round(open_s, 2), "index_bytes_per_image": round(folder_bytes(root) / size, 1),
                   "first_stage": time_queries(index, "off", rerank_k, queries, args.warmup),
                   "rerank_dynamic": time_queries(index, "dynamic", rerank_k, queries, args.warmup),
                   "faiss_threads": _faiss_threads(), "machine": machine()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _faiss_threads() -> int:
    import faiss
    return faiss.omp_get_max_threads()


def _random_vit_l(device: str):
    """A random-init timm ViT-L/16-384 SigLIP tower (no text tower) as a LoadedModel."""
    import timm

    from siglip_dola.loading import from_model
    vit = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, num_classes=0).eval().to(device)
    config = timm.data.resolve_data_config({}, model=vit)
    return from_model(vit, preprocess=timm.data.create_transform(**config), model_id="random:vit_large_patch16_siglip_384",
                      logit_scale=LOGIT_SCALE)


def _load_model(name: str, device: str):
    from siglip_dola.loading import load
    if name == "vit-l-random":
        return _random_vit_l(device)
    return load(None if name == "embedded" else name, device=device)


def write_jpegs(folder: Path, n: int, size: int) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def build_throughput(args) -> list[dict]:
    """End-to-end `build_index` images/s: decode + preprocess + one forward for all layers + write + FAISS."""
    model = _load_model(args.model, args.device)
    size = max(model.readout.image_size)
    images = write_jpegs(Path(args.workdir) / f"jpegs-{args.n_images}-{size}", args.n_images, size)
    layers = [j for j in LAYERS if j < model.readout.num_layers] or [model.readout.num_layers // 2]
    out = Path(tempfile.mkdtemp(dir=args.workdir, prefix="build-"))
    try:
        if args.warmup_images:
            build_index(sorted(images.iterdir())[:args.warmup_images], out / "warm", model, layers=layers,
                        batch_size=args.batch_size, progress=False)
        start = time.perf_counter()
        manifest = build_index([images], out / "idx", model, layers=layers, batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        row = {"bench": "build", "model": model.model_id, "device": args.device, "dtype": str(model.dtype),
               "n_images": manifest.count, "image_size": size, "layers": layers, "batch_size": args.batch_size,
               "seconds": round(seconds, 2), "images_per_s": round(manifest.count / seconds, 3),
               "index_bytes_per_image": round(folder_bytes(out / "idx") / manifest.count, 1), "machine": machine()}
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return [row]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "siglip_dola_bench"),
                        help="where synthetic galleries and test images are written (1M x 4 x 1024 fp16 = 8 GB)")
    parser.add_argument("--out", default=None, help="also write the result rows to this JSON file")
    sub = parser.add_subparsers(dest="bench", required=True)
    lat = sub.add_parser("latency", help="query latency with / without rerank on synthetic galleries")
    lat.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    lat.add_argument("--rerank-k", type=int, nargs="+", default=[100])
    lat.add_argument("--queries", type=int, default=50)
    lat.add_argument("--warmup", type=int, default=5)
    build = sub.add_parser("build", help="end-to-end index build throughput")
    build.add_argument("--model", default="embedded", help="'embedded', 'vit-l-random' or any load() name")
    build.add_argument("--device", default="cpu")
    build.add_argument("--n-images", type=int, default=64)
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--warmup-images", type=int, default=0, help="images of an untimed warm-up build")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = latency(args) if args.bench == "latency" else build_throughput(args)
    if args.out:
        from siglip_dola.io import write_json_atomic
        write_json_atomic(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
