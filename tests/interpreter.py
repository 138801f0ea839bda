"""Run a test script under Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before triton is imported,
so each script runs in a subprocess (argv[1] = this tests folder, for sibling imports) and prints one JSON line."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# The oldest triton whose CPU interpreter runs these kernels. Older interpreters fail inside triton, not in the
# kernels: 3.0 / 3.1 reject tl.arange over a constexpr argument ("arange's arguments must be of type
# tl.constexpr"), 3.2 / 3.3 lack InterpreterBuilder.get_int1_ty, 3.4 - 3.6 convert a 1-element array to a scalar
# (an error under numpy 2). Older torch releases bring such a triton (the lower-bound run: torch 2.4.1, triton 3.0.0);
# there the kernels are not interpreted and the PyTorch paths, tested everywhere, are what the CPU runs.
MIN_INTERPRETER = (3, 7)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def run_interpreted(script: str, timeout: int = 600):
    """The JSON object ``script`` prints last; skips when triton (and so its interpreter) is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed, so its CPU interpreter (TRITON_INTERPRET=1) cannot run the kernels; "
                    "the PyTorch paths are tested without it")
    from importlib.metadata import version

    found = version("triton")
    if _release(found) < MIN_INTERPRETER:
        pytest.skip(f"triton {found}'s CPU interpreter cannot run the kernels (needs triton >= "
                    f"{'.'.join(map(str, MIN_INTERPRETER))}; see tests/interpreter.py); the PyTorch paths are tested")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script, TESTS_DIR], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
