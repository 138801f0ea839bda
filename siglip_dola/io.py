"""Atomic file writes: a crash or Ctrl-C never leaves a partial file posing as complete.

The temporary file comes from `tempfile.mkstemp`, which creates it with mode 0600 whatever the umask;
before it replaces the target it gets the mode a plain ``open(path, "w")`` would have given it
(0666 minus the umask), so results, plots and indexes stay readable by whoever could read the folder.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 & ~umask (the umask is read without changing it for long)."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it; keep other threads out meanwhile
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `path`, on error it is removed.

    Whatever wrote the temp path (np.save, faiss.write_index, savefig, ...), the final file has the
    mode a plain open() would have given it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
