"""`siglip-dola calibrate` and `siglip-dola eval`: choose DoLa settings on a val split, evaluate on another.

Both run unchanged under `torchrun --nproc_per_node=K -m siglip_dola.cli ...`: each process embeds a
shard, rank 0 scores, prints and writes.
"""
from __future__ import annotations

from siglip_dola.cli import add_decode_argument, int_at_least, report_skipped, subcommand
from siglip_dola.cli.lists import typed_list
from siglip_dola.cli.model_flags import add_model_arguments, load_model
from siglip_dola.tasks import CLASSIFICATION, RETRIEVAL, RETRIEVAL_METRIC

TASK_NAMES = {"classification": CLASSIFICATION, "retrieval": RETRIEVAL}
MIN_RESAMPLES = 100  # evaluation.stats.MIN_RESAMPLES, checked here before any image is read


def _common_arguments(parser, default_split: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True,
                        help="'shapes', an ImageFolder folder, a CSV of path,label (or path,caption), wds:SHARDS "
                             "(webdataset tars, e.g. wds:/data/shards/{000000..000009}.tar), or a clip_benchmark "
                             "name (classification, or retrieval: flickr30k, flickr8k, mscoco_captions)")
    parser.add_argument("--dataset-root", default=None,
                        help="folder holding clip_benchmark datasets (default: ./clip_benchmark_data); "
                             "retrieval sets are never downloaded")
    parser.add_argument("--split", default=None,
                        help=f"dataset split (default: {default_split}; a folder without split folders or a CSV "
                             "without a 'split' column is one split, 'all', and then refuses another --split)")
    # not `--n`: torchrun's own parser would take it as an abbreviation of its --nnodes/--nproc-per-node
    parser.add_argument("--limit", type=int_at_least(1), default=None,
                        help="use only N images: the first N of 'shapes', N evenly spaced ones of a folder, CSV, "
                             "wds: shards or clip_benchmark set; more than the split holds uses all of it, with a warning "
                             "(default: all)")
    parser.add_argument("--out", required=True, help="JSON file to write (atomically)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="compute dtype (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    add_decode_argument(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar (default: shown)")
    parser.add_argument("--bank", default=None,
                        help="precomputed text bank (.safetensors / .npy) for classification, e.g. for a model "
                             "without its text tower offline; rows matched to the dataset's class names")


def _inputs(args) -> dict:
    """The files a run reads, by flag (an output may be none of them)."""
    from pathlib import Path

    return {"--dataset": args.dataset if Path(args.dataset).is_file() else None, "--bank": args.bank,
            "--calibration": getattr(args, "calibration", None)
            if Path(str(getattr(args, "calibration", None))).is_file() else None}


def load_eval_dataset(args, default_split: str):
    """The --dataset split as an EvalDataset (--split None: `default_split` where the set has it; --limit evenly
    spaced items; clip_benchmark sets from --dataset-root)."""
    from siglip_dola.data.datasets import load_dataset

    return load_dataset(args.dataset, split=args.split, n=args.limit, root=args.dataset_root,
                        default_split=default_split)


def model_from_args(args):
    """The --model / --device / --precision model (under torchrun: this rank's device)."""
    from siglip_dola import distributed

    device = args.device or (distributed.local_device() if distributed.rank_and_world()[1] > 1 else None)
    return load_model(args, device, args.precision)


def grid_arguments(parser) -> None:
    """The calibration grid's flags (calibrate, study)."""
    parser.add_argument("--alphas", type=typed_list(float, "--alphas", "0.05,0.1,0.2"), default=(0.05, 0.1, 0.2),
                        help="alpha grid (default 0.05,0.1,0.2)")
    parser.add_argument("--n-buckets", type=typed_list(int, "--n-buckets", "2,3,4"), default=(2, 3, 4),
                        help="bucket splits tried (default 2,3,4)")
    parser.add_argument("--contrast-weights", type=typed_list(float, "--contrast-weights", "1,0.5,0.25"),
                        default=(1.0, 0.5, 0.25),
                        help="contrast weight (lambda) grid; the first wins ties (default 1,0.5,0.25)")
    parser.add_argument("--static-layers", choices=("even", "all"), default="even",
                        help="layers tried for static mode (default: even)")
    parser.add_argument("--metric", default=RETRIEVAL_METRIC,
                        help="retrieval only: image_retrieval_recall@K to pick by (default: @10, search's top-k)")


def grid_from_args(args):
    """The CalibrationGrid of grid_arguments' flags."""
    from siglip_dola.evaluation.calibrate import CalibrationGrid

    return CalibrationGrid(n_buckets=args.n_buckets, static_parity=args.static_layers, alphas=args.alphas,
                           contrast_weights=args.contrast_weights)


def _calibrate_arguments(parser) -> None:
    _common_arguments(parser, "val")
    grid_arguments(parser)
    parser.add_argument("--task", choices=tuple(TASK_NAMES), default="classification",
                        help="classification: pick by acc1; retrieval: pick text -> image rerank settings by --metric")


@subcommand("calibrate", help="Choose DoLa mode, bucket / static layer, alpha and contrast weight on a validation "
                              "split (top-1, or text -> image recall with --task retrieval).")
def calibrate_command(args) -> int:
    from siglip_dola.evaluation.calibrate import calibrate
    from siglip_dola.text_bank.files import load_text_bank
    from siglip_dola.distributed import distributed_session

    from siglip_dola.io import refuse_overlapping_paths

    refuse_overlapping_paths({"--out": args.out}, _inputs(args))
    grid = grid_from_args(args)
    with distributed_session():
        bank = None if args.bank is None else load_text_bank(args.bank, rows_in_class_order=True)
        dataset = load_eval_dataset(args, "val")  # before the model: missing data fails fast
        report = calibrate(model_from_args(args), dataset, split=args.split, grid=grid, out=args.out,
                           n=args.limit, batch_size=args.batch_size, progress=args.progress,
                           task=TASK_NAMES[args.task], metric=args.metric, bank=bank, decode=args.decode)
    if report is not None:
        key, single = report["metric"], report["best_single_layer"]
        off = report["scores"][0][key]
        print(f"{report['dataset']} [{report['split']}, n={report['n_images']}] chose {report['choice']} "
              f"{key}={report['choice_metrics'][key]:.4f} (off {off:.4f}; best single layer {single['layer']} "
              f"alone {single[key]:.4f}, not DoLa) ({len(report['scores'])} grid points) -> {args.out}")
        return report_skipped(report["skipped"], getattr(args, "_prog", "siglip-dola"))
    return 0


calibrate_command.add_arguments = _calibrate_arguments


def _eval_arguments(parser) -> None:
    _common_arguments(parser, "test")
    parser.add_argument("--calibration", default=None, metavar="FILE|embedded|none",
                        help="calibration JSON from `siglip-dola calibrate`, 'embedded' or 'none' (default: the "
                             "model's own: the shipped one for the embedded model)")
    parser.add_argument("--predictions", default=None, metavar="FILE.jsonl",
                        help="also write one JSON line per image (per caption for retrieval): top-k of every mode, "
                             "premature layer, JSD per candidate layer, head-set size")
    parser.add_argument("--n-resamples", type=int_at_least(MIN_RESAMPLES), default=10_000,
                        help=f"paired bootstrap resamples for the intervals, at least {MIN_RESAMPLES} (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--plots", default=None, help="folder for the layer-lens PNGs")
    parser.add_argument("--task", choices=tuple(TASK_NAMES), default="classification",
                        help="classification (acc1/acc5/mean per-class recall) or retrieval (recall@1/5/10)")
    parser.add_argument("--workers", type=int, default=None,
                        help="image decode processes (default: the spare CPU cores; 0: decode in the main process)")
    parser.add_argument("--report", default=None, metavar="FILE.html",
                        help="also write the HTML report (as `siglip-dola report`); needs per-image rows, so "
                             "without --predictions they go to FILE.predictions.jsonl beside it")


def _report_predictions(args) -> str | None:
    """The predictions path eval writes: --predictions, or beside --report when only that is given."""
    if args.predictions is None and args.report is not None:
        if not str(args.report).endswith(".html"):
            raise ValueError(f"--report must name an .html file, got {args.report!r}")
        return str(args.report)[:-len(".html")] + ".predictions.jsonl"
    return args.predictions


@subcommand("eval", help="Evaluate off / static / dynamic DoLa on a split the calibration never saw, with paired "
                          "statistics against off.")
def eval_command(args) -> int:
    from siglip_dola.distributed import distributed_session
    from siglip_dola.evaluation.evaluate import evaluate
    from siglip_dola.evaluation.results import summary_line
    from siglip_dola.io import refuse_overlapping_paths

    predictions = _report_predictions(args)   # checked before the evaluation runs
    refuse_overlapping_paths({"--out": args.out, "--predictions": predictions, "--report": args.report},
                             _inputs(args))
    if args.plots is not None:   # the [plots] extra: checked before the evaluation runs, not after
        from siglip_dola.dependencies import require

        require("matplotlib", "plots", "--plots")
    with distributed_session():
        dataset = load_eval_dataset(args, "test")  # before the model: missing data fails fast
        report = evaluate(model_from_args(args), dataset, split=args.split, calibration=args.calibration,
                          out=args.out, plots_dir=args.plots, task=TASK_NAMES[args.task], n=args.limit,
                          batch_size=args.batch_size, progress=args.progress, predictions=predictions,
                          n_resamples=args.n_resamples, seed=args.seed, workers=args.workers, bank=args.bank,
                          decode=args.decode)
    if report is not None:   # rank 0 (torchrun): the one that wrote the result
        print(f"{summary_line(report)} -> {args.out}")
        if args.report is not None:
            from siglip_dola.viewer.report import write_report

            page = write_report(report, predictions, args.report)
            print(f"report: {page} ({page.stat().st_size / 1e6:.2f} MB)")
        return report_skipped(report["skipped"], getattr(args, "_prog", "siglip-dola"))
    return 0


eval_command.add_arguments = _eval_arguments
