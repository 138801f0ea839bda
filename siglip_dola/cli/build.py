"""`siglip-dola build`: aggregate result JSON files into one CSV table, as `clip_benchmark build` does."""
from __future__ import annotations

import sys

from siglip_dola.cli import subcommand


def _add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", help="result JSON files of `siglip-dola eval` (or clip_benchmark), or folders")
    parser.add_argument("--out", required=True, help="CSV file to write (atomically)")


@subcommand("build", help="Aggregate `eval` result JSON files into one CSV table (like `clip_benchmark build`).")
def build_command(args) -> int:
    from siglip_dola.evaluation.results import build_table

    written, skipped = build_table(args.files, args.out)
    for path, why in skipped:
        print(f"siglip-dola build: skipped {path}: {why}", file=sys.stderr)
    print(f"{written} result file(s) -> {args.out}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return 1 if skipped else 0


build_command.add_arguments = _add_arguments
