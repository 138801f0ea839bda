"""Run the `siglip-dola` CLI in-process, as the tests of its rules do: (exit code, stdout, stderr)."""
from siglip_dola.cli import main


def run(capsys, *argv):
    """main(argv) with every argument as str; argparse's own exits give their code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, err
