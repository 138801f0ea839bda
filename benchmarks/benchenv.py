"""The environment a benchmark result records: commit, versions, device, command (benchmarks/README.md)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch


def commit() -> str | None:
    """BENCH_COMMIT where set (a copy without its own .git), else the checkout's commit (+ '-dirty')."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    """Flat dict: commit, python, torch, triton, timm, open_clip, transformers versions, device, command."""
    info = dict(commit=commit(), python=platform.python_version(), torch=torch.__version__,
                device=str(device), command=" ".join(["python"] + sys.argv))
    for name in ("triton", "timm", "open_clip", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info
