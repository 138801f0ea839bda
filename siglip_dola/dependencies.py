"""What the installed environment must hold: the supported version ranges of the dependencies, and the optional
modules of the extras.

The ranges are pyproject.toml's (one place): read from a source checkout's pyproject.toml beside the package when
there is one, else from the installed distribution's metadata (Requires-Dist). A dependency installed outside pip's
resolver (``--no-deps``, conda) can be older than supported: `check_versions` says so in one line, before an
obscure failure deep inside a model call would. Only importlib.metadata is read (no dependency is imported).
"""
from __future__ import annotations

import importlib
import re
import sys
from functools import lru_cache
from pathlib import Path

DISTRIBUTION = "siglip-dola"
# optional module -> the extra that installs it; `faiss` is any build (faiss-cpu, faiss-gpu, conda's): the module
# is what counts, not the distribution that brought it
EXTRAS = {"faiss": "retrieval", "xxhash": "retrieval", "starlette": "serve", "uvicorn": "serve", "matplotlib": "plots",
          "clip_benchmark": "clip_benchmark", "requests": "clip_benchmark", "webdataset": "webdataset"}


class MissingExtraError(ModuleNotFoundError):
    """An optional module is not installed; the message names the ``pip install`` that brings it."""

    def __init__(self, module: str, extra: str, needed_for: str = ""):
        purpose = f" ({needed_for})" if needed_for else ""
        super().__init__(f"{module} is not installed{purpose}: pip install 'siglip-dola[{extra}]'", name=module)


class UnsupportedDependencyError(ImportError):
    """An installed dependency lies outside the range siglip-dola supports."""


def install_hint(module: str) -> str:
    """The pip command that installs optional `module` (any top-level module name)."""
    extra = EXTRAS.get(module.split(".")[0])
    return f"pip install 'siglip-dola[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def require(module: str, extra: str | None = None, needed_for: str = ""):
    """Import optional `module`; when it is missing, a MissingExtraError naming ``siglip-dola[extra]``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != module.split(".")[0]:
            raise   # the module is there but one of ITS imports is missing: that is its own error
        raise MissingExtraError(module, extra or EXTRAS[module.split(".")[0]], needed_for) from None


@lru_cache(maxsize=1)
def required_ranges() -> dict[str, str]:
    """{distribution: specifier} of the core dependencies (no extras), e.g. {"torch": ">=2.4.1", ...}."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():   # a source checkout: its own pyproject is the truth for this code
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == DISTRIBUTION:
            return dict(_split(line) for line in project.get("dependencies", []))
    from importlib import metadata   # here, not at import: the command's --help reads no package metadata

    try:
        lines = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return {}
    return dict(_split(line) for line in lines if ";" not in line)   # a marker (`extra == ...`): not core


def _split(requirement: str) -> tuple[str, str]:
    """'torch>=2.4.1' -> ('torch', '>=2.4.1'); 'open_clip_torch[x] >=2.32' -> ('open_clip_torch', '>=2.32')."""
    text = requirement.split(";")[0].split("#")[0].strip()
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", text).group(0)
    return name, text[len(name):].split("]")[-1].replace(" ", "").strip("()")


def unsupported() -> list[str]:
    """One line per installed core dependency outside its range; a dependency not installed is not checked here
    (its import fails with its own error)."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    problems = []
    for name, specifier in required_ranges().items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if specifier and not SpecifierSet(specifier).contains(found, prereleases=True):
            problems.append(f"{name} {found} is installed, but siglip-dola supports {name}{specifier} "
                            f"(pip install '{name}{specifier}')")
    return problems


def check_versions() -> None:
    """Raise UnsupportedDependencyError (one line) when an installed dependency is outside its supported range."""
    problems = unsupported()
    if problems:
        raise UnsupportedDependencyError("; ".join(problems))


def started_as_cli() -> bool:
    """True while the `siglip-dola` command starts: it checks the versions itself and says so without a traceback."""
    if sys.argv and Path(sys.argv[0]).name in ("siglip-dola", "siglip-dola.exe"):
        return True
    argv = getattr(sys, "orig_argv", [])
    return "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "siglip_dola"   # python -m siglip_dola
