"""Retrieval past one machine's RAM: first stage x layer store on synthetic clustered galleries, one command per size.

    python benchmarks/retrieval_scale.py --size 100000 --stores fp16 int8 pq256 pq512 --factories SQfp16
    nice -n 10 python benchmarks/retrieval_scale.py --size 1000000 --stores int8 --factories auto SQfp16

Vectors: D=1024, J=3, ``--clusters`` Gaussian centres. ``--gallery latent`` (default): an image's final
embedding is a point of a 16-dimensional latent space (a cluster centre + Gaussian variation) mapped into D
dimensions, + small isotropic noise: a low intrinsic dimension, as image embeddings have, so that near
neighbours are near at every scale and an IVF partition localises them. ``--gallery wide``: centre +
variation in one 64-dimensional subspace shared by every cluster and wider than the clusters' spacing +
isotropic noise: the neighbours of a query spread over most IVF lists (a worst case for the first stage).
Either way an image's layer j = final + isotropic noise (closer for later layers), and queries are drawn
like images with more noise. Generated in chunks from a seed and
regenerated for the exact ground truth (never more than one chunk in memory). Per (size, first stage, store):
build time, bytes per image (first stage, layer store with checksums, total), RAM at search (RssAnon of a
fresh process that opens the index and runs the queries; memory-mapped files are page cache, not counted),
p50/p99 latency of the first stage alone (mode off) and with DoLa rerank (dynamic) at K=100 and 1000 through
``search_embedding``, and recall@K of the first stage against the exact top-K. Against the fp16 store at the
same first stage (when both are in --stores): DoLa top-10 overlap, premature-layer agreement, max |d p_hat|.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchenv import commit
from siglip_dola.index_options import DEFAULT_LAYER_STORE

D, LAYERS, NUM_LAYERS, LOGIT_SCALE, CHUNK = 1024, [18, 20, 22], 24, float(math.log(100.0)), 32768
WIDE_LATENT = 64  # "wide": every cluster's variation in one shared 64-dimensional subspace, wider than the clusters
LATENT = 16  # "latent": the gallery lives near a 16-dimensional latent space (a mixture of clusters there)
LAYER_NOISE = (0.67, 0.44, 0.22)  # a layer row = final + this x a unit-norm isotropic draw (later layers closer)
GALLERIES = ("latent", "wide")


def centres(clusters: int, seed: int, dim: int = D, gallery: str = "latent") -> tuple[np.ndarray, np.ndarray]:
    """latent: cluster centres [c, LATENT] and the map [LATENT, D] into the embedding space;
    wide: cluster centres [c, D] and the basis [WIDE_LATENT, D] of the within-cluster variation."""
    rng = np.random.default_rng(seed)
    if gallery == "latent":
        return (rng.standard_normal((clusters, LATENT), dtype=np.float32),
                rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT))
    return (rng.standard_normal((clusters, dim), dtype=np.float32),
            rng.standard_normal((WIDE_LATENT, dim), dtype=np.float32) / np.sqrt(WIDE_LATENT / 4))


def _finals(rng, size: int, clusters: int, means, basis, dim: int, gallery: str, noise: float) -> np.ndarray:
    """Unit final embeddings [size, D]: a cluster centre + variation, mapped (latent) or offset (wide), + noise."""
    picked = means[rng.integers(0, clusters, size)]
    if gallery == "latent":
        u = picked + 0.5 * rng.standard_normal((size, LATENT), dtype=np.float32)
        out = u @ basis + noise * np.sqrt(LATENT / dim) * rng.standard_normal((size, dim), dtype=np.float32)
    else:
        out = (picked + rng.standard_normal((size, WIDE_LATENT), dtype=np.float32) @ basis
               + noise * rng.standard_normal((size, dim), dtype=np.float32))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def chunks(n: int, clusters: int, seed: int = 0, finals_only: bool = False, dim: int = D, gallery: str = "latent"):
    """(first id, paths, vectors [c, 1+J, D] float32) in id order; deterministic, one chunk at a time.
    finals_only: [c, 1, D], the same final rows without drawing the layers' noise (for the exact scan)."""
    means, basis = centres(clusters, seed, dim, gallery)
    noise = 0.3 if gallery == "latent" else 0.2
    for number, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, number])
        size = min(CHUNK, n - start)
        final = _finals(rng, size, clusters, means, basis, dim, gallery, noise)
        rows = [final] + ([] if finals_only else
                          [final + s / np.sqrt(dim) * rng.standard_normal((size, dim), dtype=np.float32)
                           for s in LAYER_NOISE])
        yield start, [f"synthetic/{i:09d}.jpg" for i in range(start, start + size)], np.stack(rows, axis=1)


def queries(count: int, clusters: int, seed: int = 0, dim: int = D, gallery: str = "latent", draw: int = 1) -> np.ndarray:
    """Like an image of gallery `seed` with twice its isotropic noise, normalised [count, D]; `draw` picks the set."""
    means, basis = centres(clusters, seed, dim, gallery)
    return _finals(np.random.default_rng(seed + draw), count, clusters, means, basis, dim, gallery,
                   0.6 if gallery == "latent" else 0.5)


class ExactScan:
    """Exact top-k of the queries over the final rows as the index stores them (unit, fp16-rounded), fed the
    build's own chunks (no second pass over the gallery); FAISS's ResultHeap merges the chunks."""

    def __init__(self, q: np.ndarray, k: int):
        import faiss

        self.q, self.k, self.faiss = np.ascontiguousarray(q, dtype=np.float32), k, faiss
        self.heap, self.seconds = faiss.ResultHeap(len(q), k, keep_max=True), 0.0

    def add(self, start: int, vectors: np.ndarray) -> None:
        began = time.perf_counter()
        final = vectors[:, 0] / np.linalg.norm(vectors[:, 0], axis=1, keepdims=True)
        final = final.astype(np.float16).astype(np.float32)
        scores, ids = self.faiss.knn(self.q, final, min(self.k, len(final)), metric=self.faiss.METRIC_INNER_PRODUCT)
        self.heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
        self.seconds += time.perf_counter() - began

    def ids(self) -> np.ndarray:
        self.heap.finalize()
        return self.heap.I


def build(args, root: Path, factory: str, store: str, scan: ExactScan | None = None) -> tuple[float, float]:
    """Build through the library path; (seconds, of which generating + staging). `scan` is fed every chunk."""
    from siglip_dola.retrieval.commit import StoreOptions
    from siglip_dola.retrieval.from_vectors import build_index_from_vectors

    options = StoreOptions(layer_store=store, index_factory=None if factory == "auto" else factory,
                           index_memory=args.index_memory, target_recall=args.target_recall, rerank_k=100)
    start, staged = time.perf_counter(), {}

    def gallery():
        for number, (first, paths, vectors) in enumerate(chunks(args.size, args.clusters, dim=args.dim,
                                                                  gallery=args.gallery)):
            if scan is not None:
                scan.add(first, vectors)
            yield paths, vectors
            if number % 10 == 9:
                print(f"  staged {first + len(paths)} images in {time.perf_counter() - start:.0f} s", flush=True)
        staged["s"] = time.perf_counter() - start - (scan.seconds if scan is not None else 0.0)
    build_index_from_vectors(root, gallery(), model_id="synthetic", layers=LAYERS, num_layers=NUM_LAYERS,
                             logit_scale=LOGIT_SCALE, store_options=options)
    return time.perf_counter() - start - (scan.seconds if scan is not None else 0.0), staged["s"]


def measure(args) -> None:
    """In a fresh process: open the index, time queries, report RAM (the --measure half of a run)."""
    import torch

    from siglip_dola.retrieval import RerankConfig, open_index, search_embedding
    torch.set_num_threads(1)
    index = open_index(args.measure)
    q = np.load(args.queries_file)
    out = {"latency_ms": {}, "ids": {}}
    for mode, k in (("off", 100), ("dynamic", 100), ("off", 1000), ("dynamic", 1000)):
        times, ids, results = [], [], []
        for number, text in enumerate(q):
            start = time.perf_counter()
            top = k if mode == "off" else 10  # off: every candidate, for recall@K of the first stage as searched
            result = search_embedding(index, text, RerankConfig(top_k=top, rerank_k=k, mode=mode))
            if number >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
            results.append(result)
        times = np.array(times)
        out["latency_ms"][f"{mode}@{k}"] = {"p50": round(float(np.percentile(times, 50)), 2),
                                           "p99": round(float(np.percentile(times, 99)), 2)}
        if mode == "off":
            out.setdefault("first_stage_ids", {})[str(k)] = [[int(h.item[10:19]) for h in r.results] for r in results]
        if mode == "dynamic":
            out["ids"][str(k)] = [[[h.item, h.score] for h in r.results] for r in results]
            out["premature"] = out.get("premature", {}) | {str(k): [r.premature_layer for r in results]}
    status = Path("/proc/self/status").read_text()
    out["rss_anon_mb"] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon"))) // 1024
    Path(args.measure_out).write_text(json.dumps(out))


def sizes(root: Path, n: int) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    first = sum((root / name).stat().st_size for name in (manifest["faiss_file"], manifest.get("faiss_lists_file")) if name)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    store = sum(p.stat().st_size for p in (root / "segments").rglob("*.npy"))
    return {"first_stage_B": round(first / n, 1), "layer_store_B": round(store / n, 1), "total_B": round(total / n, 1),
            "first_stage": manifest["first_stage"]}


def compare(rows: dict, reference: dict) -> dict:
    """DoLa top-10 overlap, premature-layer agreement and max |d p_hat| against the fp16 store's results."""
    out = {}
    for k in reference["ids"]:
        ours, ref = rows["ids"][k], reference["ids"][k]
        overlap = [len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in zip(ours, ref)]
        delta = [abs(sa - dict(b)[i]) for a, b in zip(ours, ref) for i, sa in a if i in dict(b)]  # same images
        agree = np.mean([a == b for a, b in zip(rows["premature"][k], reference["premature"][k])])
        out[k] = {"top10_overlap": round(float(np.mean(overlap)), 4), "min_overlap": min(overlap),
                  "premature_agreement": round(float(agree), 4), "max_abs_dp_hat": round(float(max(delta)), 5)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--gallery", choices=GALLERIES, default="latent",
                        help="latent: low intrinsic dimension (default); wide: neighbours spread over the IVF lists")
    parser.add_argument("--dim", type=int, default=D, help="embedding width (1024 for the published runs; tests use less)")
    parser.add_argument("--stores", nargs="+", default=[DEFAULT_LAYER_STORE])
    parser.add_argument("--factories", nargs="+", default=["auto"], help="'auto' (from --index-memory) or factory strings")
    parser.add_argument("--index-memory", default="4G")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/siglip_dola_scale")
    parser.add_argument("--keep", action="store_true", help="keep the built indexes")
    parser.add_argument("--out", default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--queries-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args)
        return 0
    work, code = Path(args.workdir), commit()  # the code the run starts with, not the tree when a row is written
    work.mkdir(parents=True, exist_ok=True)
    q = queries(args.queries + args.warmup, args.clusters, dim=args.dim, gallery=args.gallery)
    np.save(work / "queries.npy", q)
    scan, exact = ExactScan(q[args.warmup:], 1000), None
    rows = []
    for factory in args.factories:
        reference = None
        for store in args.stores:
            root = work / f"n{args.size}-{factory.replace(',', '_')}-{store}"
            shutil.rmtree(root, ignore_errors=True)
            build_s, staged_s = build(args, root, factory, store, scan if exact is None else None)
            if exact is None:
                exact = scan.ids()
                np.save(work / "exact_ids.npy", exact)  # [queries, 1000]: to score a re-measured index again
            print(f"  built in {build_s:.0f} s (generating + staging {staged_s:.0f} s)", flush=True)
            measured = work / "measured.json"
            subprocess.run([sys.executable, __file__, "--measure", str(root), "--queries-file", str(work / "queries.npy"),
                            "--measure-out", str(measured), "--warmup", str(args.warmup)], check=True)
            result = json.loads(measured.read_text())
            first = result.pop("first_stage_ids")  # as search returns them (refined by the stored final rows)
            recall = {k: round(float(np.mean([len(set(a[:k]) & set(b[:k])) / k
                                              for a, b in zip(first[str(k)][args.warmup:], exact)])), 4)
                      for k in (100, 1000)}
            row = {"size": args.size, "gallery": args.gallery, "clusters": args.clusters, "factory": factory, "layer_store": store, "build_s": round(build_s, 1),
                   "staging_s": round(staged_s, 1),
                   **sizes(root, args.size), "rss_anon_mb_at_search": result["rss_anon_mb"],
                   "latency_ms": result["latency_ms"], "recall_vs_exact": recall, "exact_scan_s": round(scan.seconds, 1),
                   "load_avg_1m": round(os.getloadavg()[0], 2), "cores": os.cpu_count(), "commit": code}
            if store == "fp16":
                reference = result
            elif reference is not None:
                row["vs_fp16_store"] = compare(result, reference)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
