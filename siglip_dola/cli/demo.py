"""`siglip-dola demo`: the offline first run on the embedded default model."""
from __future__ import annotations

from siglip_dola.cli import int_at_least, subcommand
from siglip_dola.modes import CONTRASTING


def _add_arguments(parser) -> None:
    parser.add_argument("--out", default="siglip-dola-demo", help="folder for the generated images (default ./siglip-dola-demo)")
    parser.add_argument("--n", type=int_at_least(1), default=8, help="number of images (default 8)")
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded model)")
    parser.add_argument("--mode", choices=list(CONTRASTING), default=None,
                        help="default: the embedded model's shipped calibration (chosen on the val split)")
    parser.add_argument("--calibration", default=None, metavar="FILE|embedded|none",
                        help="calibration to apply (default: the model's own, the shipped one for the embedded model)")
    parser.add_argument("--seed", type=int, default=0)


@subcommand("demo", help="Classify a few generated images with the baseline and with DoLa (offline, embedded model).")
def demo_command(args) -> int:
    """Run the demo, print its table and how to switch to real SigLIP weights."""
    from siglip_dola.demo import REAL_MODEL_HINT, format_table, run_demo

    rows, config, effect = run_demo(args.out, n=args.n, model_name=args.model, mode=args.mode, seed=args.seed,
                                    calibration=args.calibration)
    print(f"Generated {len(rows)} test-split images of the 'shapes' dataset in {args.out}/ ({config})")
    print(format_table(rows))
    print(effect)
    print()
    print(REAL_MODEL_HINT)
    return 0


demo_command.add_arguments = _add_arguments
