"""`siglip-dola report RESULT.json PREDICTIONS.jsonl --out report.html`: the self-contained HTML report."""
from __future__ import annotations

from siglip_dola.cli import subcommand


def _thumb_size(text: str) -> int:
    from siglip_dola.viewer.thumbnails import MAX_THUMB_SIZE

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 8 <= value <= MAX_THUMB_SIZE:
        raise ValueError(f"--thumb-size must be an integer in [8, {MAX_THUMB_SIZE}] px, got {text!r}")
    return value


def _report_arguments(parser) -> None:
    parser.add_argument("result", help="Result JSON of `siglip-dola eval --out`")
    parser.add_argument("predictions", nargs="?", default=None,
                        help="Predictions JSONL of `eval --predictions` (default: the file the result names)")
    parser.add_argument("--out", required=True, help="HTML file to write (atomically)")
    parser.add_argument("--thumb-size", type=str, default="64", help="thumbnail size in px, at most 96 (default 64)")
    parser.add_argument("--image-root", default=None, help="folder to look in for images that moved (by file name)")


@subcommand("report", help="Write a self-contained HTML report (summary, layer lens, per-image flips) of an eval run.")
def report_command(args) -> int:
    from siglip_dola.cli import EXIT_OK, EXIT_SKIPPED
    from siglip_dola.io import refuse_overlapping_paths
    from siglip_dola.viewer.report import write_report
    from siglip_dola.viewer.report_data import read_result

    refuse_overlapping_paths({"--out": args.out}, {"RESULT": args.result, "PREDICTIONS": args.predictions})
    result = read_result(args.result)
    predictions = args.predictions or result.get("predictions")
    if not predictions:
        raise ValueError("give PREDICTIONS (the result names no predictions file; run eval with --predictions FILE.jsonl)")
    refuse_overlapping_paths({"--out": args.out}, {"PREDICTIONS": predictions})  # the one the result names
    bad_lines: list[str] = []
    out = write_report(result, predictions, args.out, thumb_size=_thumb_size(args.thumb_size),
                       image_root=args.image_root, bad_lines=bad_lines)
    print(f"report: {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return EXIT_SKIPPED if bad_lines else EXIT_OK  # the bad lines were named on stderr (a warning)


report_command.add_arguments = _report_arguments
