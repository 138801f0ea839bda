"""The public surface: every exported name resolves, the CLI registers every subcommand."""
import subprocess
import sys

import pytest

import siglip_dola
from siglip_dola.cli import SUBCOMMANDS, build_parser

COMMANDS = {"classify", "rerank", "demo", "calibrate", "eval", "index", "search", "shapes", "build", "report", "serve", "study"}


def test_every_export_resolves():
    for name in siglip_dola.__all__:
        assert getattr(siglip_dola, name) is not None, name
    assert callable(siglip_dola.readout.from_model)


def test_cli_lists_every_subcommand(capsys):
    assert set(SUBCOMMANDS) == COMMANDS
    for command in sorted(COMMANDS):   # each one is a real choice of the parser, with its own usage line
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: siglip-dola {command} ")
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["no-such-command"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "siglip_dola", "--help"], capture_output=True, text=True, check=True)
    assert "classify" in out.stdout and "demo" in out.stdout


def test_int_options_state_their_bound(capsys):
    import pytest

    from siglip_dola.cli import main

    for argv, bound in ((["demo", "--n", "0"], ">= 1"), (["shapes", "export", "/tmp/unused", "--n", "-1"], ">= 0"),
                        (["demo", "--n", "many"], ">= 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and bound in capsys.readouterr().err
