"""Import cost of `siglip-dola --help`, `classify` and `demo`, measured with `python -X importtime`.

For each command and each source tree (this checkout, and with --baseline PATH another checkout, e.g. main
before a change), the command runs `--repeats` times in a fresh interpreter; the figure is the median of the
summed top-level cumulative import times (`-X importtime`, so work after the imports is not counted), with
the heavy optional modules each run imported. Run under `nice` on a shared machine:

    nice -n 10 python benchmarks/import_time.py --baseline /path/to/main --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAVY = ("torch", "transformers", "open_clip", "timm", "faiss", "starlette", "uvicorn", "matplotlib", "scipy",
         "statsmodels", "webdataset")


def imports_of(stderr: str) -> tuple[float, int, list[str]]:
    """(seconds of top-level imports, modules imported, heavy modules imported) from `-X importtime` output."""
    total, seen = 0, set()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if name.startswith(" ") and not name.startswith("  ") and cumulative.strip().isdigit():
            total += int(cumulative)  # one space before the name: a top-level import
        seen.add(name.strip())
    return total / 1e6, len(seen), sorted(m for m in HEAVY if m in seen)


def measure(tree: Path, argv: list[str], cwd: Path, repeats: int) -> tuple[float, int, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "siglip_dola", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, check=True)
        runs.append(imports_of(done.stderr))
    return statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to measure beside this one")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        subprocess.run([sys.executable, "-m", "siglip_dola", "shapes", "export", "img", "--n", "2"], cwd=cwd,
                       env={**os.environ, "PYTHONPATH": str(here)}, check=True, capture_output=True)
        commands = {"--help": ["--help"],
                    "classify": ["classify", "img", "--labels", "red circle,blue square"],
                    "demo": ["demo", "--n", "2", "--out", "demo"]}
        print(f"| command | {' | '.join(f'{name}: import s, modules (heavy ones)' for name in trees)} |")
        print(f"|---|{'---|' * len(trees)}")
        for label, argv in commands.items():
            cells = []
            for tree in trees.values():
                seconds, count, heavy = measure(tree, argv, cwd, args.repeats)
                cells.append(f"{seconds:.2f} s, {count} ({', '.join(heavy) or 'none'})")
            print(f"| `{label}` | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
