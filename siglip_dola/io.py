"""The one output writer: a crash or Ctrl-C never leaves a partial file posing as complete, and nothing
that is not a regular file is ever replaced.

- A regular file (or a new one) is written to a temp file in its folder, which then replaces it
  (`os.replace`). The temp file comes from `tempfile.mkstemp` (mode 0600 whatever the umask); before it
  replaces the target it gets the mode a plain ``open(path, "w")`` would have given it (0666 minus the
  umask), so results, plots and indexes stay readable by whoever could read the folder.
- A symlink is followed: its target is written atomically and the link stays a link.
- A target that exists and is not a regular file (``/dev/null``, ``/dev/full``, a FIFO) is written
  THROUGH, as ``open(path, "w")`` would: the bytes go to the device, a write error is an error; the node
  is never replaced. A folder is refused.
- An error names the file the caller asked for, never the temp file.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
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


def _existing_kind(target: Path) -> str | None:
    """None (missing), "file", "dir" or "special" (device, FIFO, socket) of what a path leads to (links followed)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "special"


def _name_the_target(err: OSError, asked: Path, tmp: Path) -> None:
    """Make an OSError about the temp file (or about no file) name the path the caller asked for."""
    if err.filename is None or str(err.filename) == str(tmp):
        err.filename = str(asked)
    if err.filename2 is not None and str(err.filename2) in (str(tmp), os.path.realpath(asked)):
        err.filename2 = None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success its bytes become `path` (see the module note), on error
    it is removed and `path` is left as it was.

    Whatever wrote the temp path (np.save, faiss.write_index, savefig, ...), a new or replaced file has
    the mode a plain open() would have given it.
    """
    asked = Path(path)
    kind = _existing_kind(asked)
    if kind == "dir":
        raise IsADirectoryError(21, "Is a directory (an output file is expected)", str(asked))
    # a symlink: write its target and keep the link; a device is opened by the asked name (/dev/stdout's
    # target, /proc/self/fd/1 -> 'pipe:[...]', resolves to no path)
    target = asked if kind == "special" else Path(os.path.realpath(asked))
    folder = target.parent if kind != "special" else None  # a device's folder (/dev) holds no temp files
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if kind == "special":
            with open(tmp, "rb") as source, open(target, "wb") as sink:  # through the node, never over it
                shutil.copyfileobj(source, sink)
        else:
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, target)
    except OSError as err:
        _name_the_target(err, asked, tmp)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one file: equal after resolving links, or the same existing inode."""
    a, b = Path(a), Path(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_overlapping_paths(outputs: dict, inputs: dict | None = None) -> None:
    """ValueError when an output is also an input, or two outputs are one file (before anything runs).

    `outputs`, `inputs`: {name shown in the message (a flag): path or None}. Devices such as /dev/null
    may be named twice: writing through them twice loses nothing.
    """
    named_outputs = [(name, p) for name, p in outputs.items() if p is not None]
    named_inputs = [(name, p) for name, p in (inputs or {}).items() if p is not None]
    for index, (name, path) in enumerate(named_outputs):
        if _existing_kind(Path(path)) == "special":
            continue
        for other, other_path in named_inputs:
            if same_file(path, other_path):
                raise ValueError(f"{name} {str(path)!r} is also the input {other}: it would be overwritten; "
                                 "write to another file")
        for other, other_path in named_outputs[index + 1:]:
            if same_file(path, other_path):
                raise ValueError(f"{name} and {other} are the same file {str(path)!r}: one would overwrite "
                                 "the other; give them different paths")
