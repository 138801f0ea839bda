"""`siglip-dola calibrate` and `siglip-dola eval`: choose DoLa settings on a val split, evaluate on another.

Both run unchanged under `torchrun --nproc_per_node=K -m siglip_dola.cli ...`: each process embeds a
shard, rank 0 scores, prints and writes.
"""
from __future__ import annotations

from siglip_dola.cli import subcommand

TASK_NAMES = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers such as 0.05,0.1,0.2, got {text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated ints such as 2,3,4, got {text!r}") from None


def _common_arguments(parser, default_split: str) -> None:
    parser.add_argument("--model", default=None, help="model name, hub id or local path (default: the embedded model)")
    parser.add_argument("--dataset", required=True,
                        help="'shapes', an ImageFolder folder, a CSV of path,label, or a clip_benchmark name")
    parser.add_argument("--split", default=default_split, help=f"dataset split (default: {default_split})")
    # not `--n`: torchrun's own parser would take it as an abbreviation of its --nnodes/--nproc-per-node
    parser.add_argument("--limit", type=int, default=None, help="use only N evenly spaced images (default: all)")
    parser.add_argument("--out", required=True, help="JSON file to write (atomically)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="compute dtype (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--bank", default=None,
                        help="precomputed text bank (.safetensors / .npy) for classification, e.g. for a model "
                             "without its text tower offline; rows matched to the dataset's class names")


def _load_model(args):
    from siglip_dola import distributed
    from siglip_dola.loading import load

    device = args.device or (distributed.local_device() if distributed.rank_and_world()[1] > 1 else None)
    try:
        return load(args.model, device=device, precision=args.precision)
    except OSError as err:  # unknown names / missing hub files surface as OSError subclasses too
        raise ValueError(str(err)) from None


def _calibrate_arguments(parser) -> None:
    _common_arguments(parser, "val")
    parser.add_argument("--alphas", type=_float_list, default=(0.05, 0.1, 0.2), help="alpha grid (default 0.05,0.1,0.2)")
    parser.add_argument("--n-buckets", type=_int_list, default=(2, 3, 4), help="bucket splits tried (default 2,3,4)")
    parser.add_argument("--static-layers", choices=("even", "all"), default="even",
                        help="layers tried for static mode (default: even)")


@subcommand("calibrate", help="Choose DoLa mode, bucket / static layer and alpha by top-1 on a validation split.")
def calibrate_command(args) -> int:
    from siglip_dola.evaluation.calibrate import CalibrationGrid, calibrate
    from siglip_dola.text_bank import load_text_bank
    from siglip_dola.distributed import distributed_session

    grid = CalibrationGrid(n_buckets=args.n_buckets, static_parity=args.static_layers, alphas=args.alphas)
    with distributed_session():
        bank = None if args.bank is None else load_text_bank(args.bank)
        report = calibrate(_load_model(args), args.dataset, split=args.split, grid=grid, out=args.out,
                           n=args.limit, batch_size=args.batch_size, progress=args.progress, bank=bank)
    if report is not None:
        metrics = report["choice_metrics"]
        print(f"{report['dataset']} [{report['split']}, n={report['n_images']}] chose {report['choice']} "
              f"acc1={metrics['acc1']:.4f} ({len(report['scores'])} grid points) -> {args.out}")
    return 0


calibrate_command.add_arguments = _calibrate_arguments


def _eval_arguments(parser) -> None:
    _common_arguments(parser, "test")
    parser.add_argument("--calibration", default=None, help="calibration JSON from `siglip-dola calibrate`")
    parser.add_argument("--plots", default=None, help="folder for the layer-lens PNGs")
    parser.add_argument("--task", choices=tuple(TASK_NAMES), default="classification",
                        help="classification (acc1/acc5/mean per-class recall) or retrieval (recall@1/5/10)")
    parser.add_argument("--workers", type=int, default=None,
                        help="image decode processes (default: the spare CPU cores; 0: decode in the main process)")


@subcommand("eval", help="Evaluate off / static / dynamic DoLa on a split the calibration never saw.")
def eval_command(args) -> int:
    from siglip_dola.distributed import distributed_session
    from siglip_dola.evaluation.evaluate import evaluate, summary_line

    with distributed_session():
        report = evaluate(_load_model(args), args.dataset, split=args.split, calibration=args.calibration,
                          out=args.out, plots_dir=args.plots, task=TASK_NAMES[args.task], n=args.limit,
                          batch_size=args.batch_size, progress=args.progress, workers=args.workers,
                          bank=args.bank)
    if report is not None:
        print(f"{summary_line(report)} -> {args.out}")
    return 0


eval_command.add_arguments = _eval_arguments
