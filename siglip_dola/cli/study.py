"""`siglip-dola study --datasets a,b,c|@file --out DIR`: calibrate + eval per dataset, one table, the forest plot.

DIR/results/<dataset>.json (eval's result JSON + `calibrated_on`), DIR/calibrations/<dataset>.json, DIR/table.csv
(`build` over the results), DIR/study.html (the forest plot). A dataset whose result exists is skipped unless
--overwrite, so rerunning an interrupted study resumes it.
"""
from __future__ import annotations

import sys

from siglip_dola.cli import EXIT_OK, EXIT_SKIPPED, int_at_least, report_skipped, subcommand
from siglip_dola.cli.evaluate import TASK_NAMES, grid_arguments, grid_from_args
from siglip_dola.cli.model_flags import add_model_arguments


def _study_arguments(parser) -> None:
    parser.add_argument("--datasets", required=True, metavar="A,B,C|@FILE",
                        help="datasets, comma-separated or @file (one per line; '#' comments), each one `eval` "
                             "accepts: shapes, folders, CSVs, wds:SHARDS, clip_benchmark names")
    parser.add_argument("--out", required=True, metavar="DIR", help="study folder (results/, calibrations/, "
                        "table.csv, study.html)")
    add_model_arguments(parser)
    parser.add_argument("--dataset-root", default=None, help="folder holding clip_benchmark datasets "
                        "(default: ./clip_benchmark_data)")
    parser.add_argument("--task", choices=("auto", *TASK_NAMES), default="auto",
                        help="auto: classification where the set has labels, else retrieval (default: auto)")
    parser.add_argument("--limit", type=int_at_least(1), default=None,
                        help="at most N evenly spaced items of each calibration and test split (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="redo datasets whose result exists")
    grid_arguments(parser)
    parser.add_argument("--n-resamples", type=int_at_least(1), default=10_000, help="paired bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="compute dtype (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def format_table(rows: list[dict]) -> str:
    """The study as a fixed-width text table, one line per dataset."""
    header = ("dataset", "task", "metric", "n", "calibrated on", "off", "chosen", "value", "delta [95% CI]", "McNemar p")
    lines = [header]
    for row in rows:
        lines.append((row["label"], (row["task"] or "").replace("zeroshot_", ""), row["metric"], str(row["n"]),
                      str(row["calibrated_on"]), "-" if row["off"] is None else f"{row['off']:.4f}", row["mode_label"],
                      "-" if row["value"] is None else f"{row['value']:.4f}", row["interval"] or "-",
                      "-" if row["mcnemar_p"] is None else f"{row['mcnemar_p']:.2g}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


@subcommand("study", help="Run calibrate + eval over many datasets (comma-separated or @file): one result JSON "
                          "each, one table, and a forest-plot page. Resumes: finished datasets are skipped.")
def study_command(args) -> int:
    import json

    from siglip_dola.cli.evaluate import model_from_args
    from siglip_dola.distributed import distributed_session
    from siglip_dola.evaluation.results import build_table
    from siglip_dola.evaluation.study import parse_dataset_list, run_study
    from siglip_dola.viewer.study_page import study_rows, write_study_page

    names = parse_dataset_list(args.datasets)
    grid = grid_from_args(args)
    with distributed_session() as (rank, _):
        run = run_study(model_from_args(args), names, args.out, overwrite=args.overwrite, task=args.task if args.task
                        == "auto" else TASK_NAMES[args.task], root=args.dataset_root, limit=args.limit, grid=grid,
                        batch_size=args.batch_size, progress=args.progress, n_resamples=args.n_resamples,
                        seed=args.seed, metric=args.metric)
    if rank != 0:  # rank 0 wrote the results; it builds the table and the page
        return EXIT_OK
    if run.kept:
        print(f"kept {len(run.kept)} finished dataset(s) (--overwrite redoes them): {', '.join(run.kept)}")
    files = run.result_paths(names)
    if not files:
        raise ValueError(f"no dataset of the study finished: "
                         + "; ".join(f"{name}: {why}" for name, why in run.failed))
    build_table(files, run.out_dir / "table.csv")
    page = write_study_page(files, run.out_dir / "study.html")
    print(format_table(study_rows([json.loads(f.read_text(encoding="utf-8")) for f in files])))
    print(f"{len(files)} result(s) in {run.out_dir / 'results'}; table: {run.out_dir / 'table.csv'}; "
          f"forest plot: {page}")
    for name, why in run.failed:
        print(f"siglip-dola study: failed {name}: {why}", file=sys.stderr)
    skipped = [item for name in run.done for item in json.loads(run.result_path(name).read_text())["skipped"]]
    return EXIT_SKIPPED if run.failed or report_skipped(skipped, args._prog) else EXIT_OK


study_command.add_arguments = _study_arguments
