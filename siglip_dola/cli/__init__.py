"""The `siglip-dola` command line: argparse subcommands that parse arguments and call typed library functions.

Shared by every command (so a new command gets it for free):
- exit status: EXIT_OK 0, EXIT_SKIPPED 1 (finished, but some input files were skipped: each is listed on
  stderr), EXIT_ERROR 2 (bad arguments or an error: one line on stderr, no traceback), 130 (Ctrl-C);
- `--help` shows every option's default; `siglip-dola --version`;
- errors and warnings are one line, prefixed with the full command ("siglip-dola index build: error: ..."),
  and a library message naming a Python parameter (``top_k``, ``mode='static'``) names the flag instead.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import pkgutil
import re
import sys
import warnings
from contextlib import contextmanager

from siglip_dola.dependencies import MissingExtraError, check_versions, install_hint

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`
EXIT_STATUS_HELP = ("exit status: 0 success; 1 finished but some input files were skipped (each listed on "
                    "stderr as 'skipped PATH: REASON'); 2 bad arguments or an error; 130 interrupted; 141 the "
                    "reader of stdout went away (a pipe into head)")

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


def int_in_range(low: int, high: int):
    """An argparse `type=` that parses an int in [low, high], with an error that states the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    parse.__name__ = f"int in {low}..{high}"
    return parse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default or it has none."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)  # an option declared without help still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action) -> str:
        text = (action.help or "").strip()
        if (action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or "default" in text or isinstance(action, argparse._VersionAction)):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})".strip()


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose type errors keep their message and whose errors are one line, not the usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)  # every (sub-)command documents the exit-code rule
        super().__init__(*args, **kwargs)

    def _get_value(self, action, arg_string):
        # argparse turns a ValueError of a `type=` function into "invalid parse_layers value"; keep its text
        type_func = self._registry_get("type", action.type, action.type)
        if callable(type_func) and type_func not in (int, float, str):
            try:
                type_func(arg_string)
            except argparse.ArgumentTypeError:
                pass  # argparse reports these with their message itself
            except ValueError as err:
                if str(err):
                    raise argparse.ArgumentError(action, str(err)) from None
        return super()._get_value(action, arg_string)

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def _package_version() -> str:
    from siglip_dola.version import __version__

    return __version__


class _VersionAction(argparse.Action):
    """--version, with the version read only when asked (importlib.metadata costs ~0.1 s on every command)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_package_version()}")
        parser.exit(0)


def _tag_leaves(parser: argparse.ArgumentParser) -> None:
    """Give each (sub-)sub-parser's namespace its full prog and a dest -> --flag map (for error messages)."""
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
    parser.set_defaults(_prog=parser.prog, _flags=flags)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for listed in action._choices_actions:  # `index build --help` opens with what `index --help` lists
                child = action.choices[listed.dest]
                if child.description is None:
                    child.description = listed.help
            for child in action.choices.values():
                _tag_leaves(child)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered subcommand."""
    parser = Parser(prog="siglip-dola", description="DoLa for SigLIP vision towers.", epilog=EXIT_STATUS_HELP)
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, fn) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_STATUS_HELP)
        fn.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=fn)
    _tag_leaves(parser)
    return parser


def add_decode_argument(parser) -> None:
    """--decode cpu|gpu: where image files are decoded (the library's `decode=`)."""
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu",
                        help="where JPEG files are decoded: cpu (PIL in the workers, default) or gpu (nvJPEG and the "
                             "model's resize/crop/normalise on the CUDA device: for hosts with few cores per GPU; "
                             "pixels agree closely, not exactly, with PIL's: see docs/evaluation.md)")


def flag_words(message: str, flags: dict[str, str]) -> str:
    """Rewrite Python parameter names in a library message as the CLI flags they came from.

    ``top_k must be ...`` -> ``--top-k must be ...``; ``mode='static'`` -> ``--mode static``. Names
    without an underscore ("mode", "alpha") are rewritten only where they are plainly the parameter
    (followed by "=" or starting a clause before "must/is/should"), so prose stays prose.
    """
    for dest, flag in sorted(flags.items(), key=lambda item: -len(item[0])):
        message = re.sub(rf"(?<![\w.-]){re.escape(dest)}=(['\"]?)([^\s,;)'\"]*)\1",
                         lambda m, flag=flag: flag if m.group(2) == "True" else f"{flag} {m.group(2)}", message)
        if "_" in dest:
            message = re.sub(rf"(?<![\w.-]){re.escape(dest)}(?![\w(])", flag, message)
        else:
            message = re.sub(rf"(?:^|(?<=: )|(?<=; )|(?<=\())({re.escape(dest)})(?= (?:must|is|should)\b)",
                             flag, message)
    return message


def report_skipped(skipped, prog: str = "siglip-dola") -> int:
    """Print each skipped file to stderr ('skipped PATH: REASON'); EXIT_SKIPPED if any, else EXIT_OK.

    `skipped`: [(path, error)] or [{"path", "error"}].
    """
    for item in skipped:
        path, error = (item["path"], item["error"]) if isinstance(item, dict) else item
        print(f"skipped {safe_text(path)}: {safe_text(error)}", file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def safe_text(value) -> str:
    """str(value) printable on any terminal: undecodable file-name bytes become \\x.. escapes."""
    text = str(value)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")  # surrogate-escaped bytes -> \xff
    except UnicodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def _warnings_to_stderr(prog: str, flags: dict[str, str]):
    """Warnings as one 'PROG: warning: ...' line each (not file:line + source), parameter names as the command's
    flags (:func:`flag_words`), for the command's duration."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {flag_words(str(message), flags)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _error_text(err: BaseException) -> str:
    if isinstance(err, MissingExtraError):
        return str(err)   # names the extra's pip install already
    if isinstance(err, ModuleNotFoundError):
        return f"{err} (an optional dependency is missing; install it with: {install_hint(err.name or '')})"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {safe_text(err.filename)}"
        if err.errno == 28:  # ENOSPC
            text += " (the disk is full: nothing committed was changed; free space and rerun)"
        return text
    return str(err) or type(err).__name__


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (`search --json | head`): stop quietly, as `cat` or `grep` do when
    killed by SIGPIPE, with their status 128 + SIGPIPE; stdout goes to /dev/null so the interpreter's
    final flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `siglip-dola` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # --help and --version print here
        if getattr(args, "handler", None) is None:
            parser.print_help()
            return EXIT_ERROR
    except BrokenPipeError:
        return _reader_went_away()
    except SystemExit:  # argparse's exits: flush their text here, so a closed pipe is not a shutdown traceback
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            raise SystemExit(_reader_went_away()) from None
        raise
    prog = getattr(args, "_prog", f"siglip-dola {args.command}")
    try:
        check_versions()   # an installed dependency outside its supported range: one line, exit 2
        with _warnings_to_stderr(prog, getattr(args, "_flags", {})):
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at exit
            return code
    except BrokenPipeError:
        return _reader_went_away()
    except (ValueError, TypeError, RuntimeError, OSError, ImportError, MemoryError) as err:
        # PIL's UnidentifiedImageError, IsADirectoryError, a full disk... are OSErrors
        print(f"{prog}: error: {flag_words(safe_text(_error_text(err)), getattr(args, '_flags', {}))}",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# Every other module of this package is a subcommand module (model_flags.py: the flags several share):
# importing it registers its handlers with the `subcommand` decorator, so a new command is a new file here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

if __name__ == "__main__":
    # Run as a script this file is `__main__`, a second copy of the module; the subcommands registered
    # themselves with `siglip_dola.cli`, so dispatch through that one.
    from siglip_dola.cli import main as _main
    sys.exit(_main())
