"""`siglip-dola build`: aggregate result JSON files into one CSV table, as `clip_benchmark build` does."""
from __future__ import annotations

from siglip_dola.cli import subcommand


def _add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", help="result JSON files of `siglip-dola eval` (or clip_benchmark), or folders")
    parser.add_argument("--out", required=True, help="CSV file to write (atomically)")


@subcommand("build", help="Aggregate `eval` result JSON files into one CSV table (like `clip_benchmark build`).")
def build_command(args) -> int:
    from siglip_dola.cli import report_skipped
    from siglip_dola.evaluation.results import build_table, result_files
    from siglip_dola.io import refuse_overlapping_paths

    refuse_overlapping_paths({"--out": args.out}, {"FILES": None, **{str(p): p for p in result_files(args.files)}})
    written, skipped = build_table(args.files, args.out)
    print(f"{written} result file(s) -> {args.out}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return report_skipped(skipped, getattr(args, "_prog", "siglip-dola build"))


build_command.add_arguments = _add_arguments
