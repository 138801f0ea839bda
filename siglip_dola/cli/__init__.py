"""The `siglip-dola` command line: argparse subcommands that parse arguments and call typed library functions."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

# Each subcommand registers itself here as (name, add_arguments(parser), handler(args) -> exit code).
# Handlers import their library modules lazily so `siglip-dola --help` stays fast.
SUBCOMMANDS: dict = {}


def subcommand(name: str, help: str):
    """Decorator: register `fn(args) -> int` as subcommand `name`; `fn.add_arguments(parser)` declares its options."""
    def register(fn):
        SUBCOMMANDS[name] = (help, fn)
        return fn
    return register


def int_at_least(minimum: int):
    """An argparse `type=` that parses an int >= minimum, with an error that states the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered subcommand."""
    parser = argparse.ArgumentParser(prog="siglip-dola", description="DoLa for SigLIP vision towers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, fn) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        fn.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `siglip-dola` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"siglip-dola {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Every other module of this package is a subcommand module: importing it registers its handlers with
# the `subcommand` decorator, so a new command is a new file here and nothing else.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

if __name__ == "__main__":
    # Run as a script this file is `__main__`, a second copy of the module; the subcommands registered
    # themselves with `siglip_dola.cli`, so dispatch through that one.
    from siglip_dola.cli import main as _main
    sys.exit(_main())
