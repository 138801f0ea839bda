"""Peak memory of calibration's grid scoring: the old all-layers cache vs today's row chunks.

Synthetic embeddings (n images x D, N-1 layers, a [C, D] bank) stand in for a split: only the scoring after the
embedding pass is measured, for 3 grid points (off, dynamic bucket 3 of 3, static layer 2; a point adds O(n) to
the peak, not O(n*C)) and, in the chunked run, every single layer's top-1 as calibrate does. Each case runs in a fresh subprocess; "peak beyond embeddings" = the process's peak
RSS (ru_maxrss) minus its RSS once the embeddings exist. Both algorithms score the same grid and must agree.

    python benchmarks/calibration_memory.py --n 50000 --classes 1000 --layers 23            # chunked only
    python benchmarks/calibration_memory.py --n 10000 --classes 1000 --layers 23 --both     # + the old cache
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from siglip_dola import scoring
from siglip_dola.evaluation.calibrate import CalibrationGrid, grid_points, score_grid
from siglip_dola.evaluation.layer_logits import LayerLogits, score_point
from siglip_dola.evaluation.metrics import classification_metrics, rank_scores

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

n, classes, layers, dim, algorithm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
z_final, z_layers, bank = torch.randn(n, dim), torch.randn(layers, n, dim), torch.randn(classes, dim)
labels = torch.randint(0, classes, (n,))
grid = CalibrationGrid(n_buckets=(3,), alphas=(0.1,), contrast_weights=(0.5,))
points = [p for p in grid_points(grid, layers + 1) if p.mode != "static" or p.static_layer == 2]  # 3 points

base = rss_kb()
start = time.perf_counter()
final = scoring.build_log_probs_from_rep(z_final, bank, 0.05)
if algorithm == "chunked":
    cache = LayerLogits(final, labels, None, 0.05, row_layers=z_layers, columns=bank)
    scores = score_grid(cache, points)[0]
    acc1 = [s["acc1"] for s in scores]
else:  # the old algorithm: every layer's log-probs cached at once, then each point
    cached = scoring.build_log_probs_from_rep(z_layers, bank, 0.05)  # (N-1, n, C)
    acc1 = [classification_metrics(rank_scores(score_point(final, cached, p)), labels)["acc1"] for p in points]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"algorithm": algorithm, "n": n, "classes": classes, "layers": layers, "dim": dim,
                  "points": len(points), "embeddings_mb": round(base / 1024, 1),
                  "peak_beyond_embeddings_mb": round((peak - base) / 1024, 1),
                  "seconds": round(time.perf_counter() - start, 1), "acc1": acc1}))
"""


def run(n: int, classes: int, layers: int, dim: int, algorithm: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(classes), str(layers), str(dim), algorithm],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=23, help="N-1 candidate layers")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--both", action="store_true", help="also run the old all-layers cache (needs ~2x N*n*C*4 B)")
    args = parser.parse_args()
    rows = [run(args.n, args.classes, args.layers, args.dim, "chunked")]
    if args.both:
        rows.append(run(args.n, args.classes, args.layers, args.dim, "all-at-once"))
        assert rows[0]["acc1"] == rows[1]["acc1"], "the two algorithms disagree"
    cache_mb = args.layers * args.n * args.classes * 4 / 2**20
    for row in rows:
        acc1 = row.pop("acc1")
        print(json.dumps({**row, "old_cache_alone_mb": round(cache_mb, 1), "grid_acc1_first": acc1[:3]}))


if __name__ == "__main__":
    main()
