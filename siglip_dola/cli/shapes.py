"""`siglip-dola shapes export DIR`: write images of the generated `shapes` dataset with labels and captions."""
from __future__ import annotations

from siglip_dola.cli import int_at_least, subcommand

SPLITS = ("train", "val", "test")


def _add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="shapes_action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write PNGs, labels.csv, captions.csv and classnames.txt into DIR")
    export.add_argument("dir", help="output folder (created if missing)")
    export.add_argument("--split", choices=SPLITS, default="test")
    export.add_argument("--n", type=int_at_least(0), default=50, help="number of images (default 50)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--overwrite", action="store_true",
                        help="replace the label files of a dataset already in DIR (its older images lose their labels)")


@subcommand("shapes", help="The generated shapes dataset (colour x shape, some combinations held out of train).")
def shapes_command(args) -> int:
    """Dispatch `shapes export`: call `siglip_dola.data.shapes.export` and print where it wrote."""
    from siglip_dola.data import shapes

    out_dir = shapes.export(args.dir, split=args.split, n=args.n, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.n} {args.split} images (seed {args.seed}) with labels.csv, captions.csv, "
          f"classnames.txt to {out_dir}")
    return 0


shapes_command.add_arguments = _add_arguments
