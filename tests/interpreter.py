"""Run a test script under Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before triton is imported,
so each script runs in a subprocess (argv[1] = this tests folder, for sibling imports) and prints one JSON line."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_interpreted(script: str, timeout: int = 600):
    """The JSON object ``script`` prints last; skips when triton (and so its interpreter) is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed, so its CPU interpreter (TRITON_INTERPRET=1) cannot run the kernels; "
                    "the PyTorch paths are tested without it")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script, TESTS_DIR], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
