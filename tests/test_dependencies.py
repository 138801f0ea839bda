"""Installing next to the user's own packages: optional extras, supported ranges, the one version.

A missing optional module is simulated in a fresh interpreter by an import hook that refuses it (as an environment
without it would), never by uninstalling anything. An unsupported version is a fake dist-info placed first on the
path, as a `pip install --no-deps` or conda leftover would be found.
"""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import siglip_dola
from siglip_dola import dependencies

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# (requests is not among them: huggingface_hub < 1.0, which older transformers need, imports it itself)
OPTIONAL = ["faiss", "xxhash", "starlette", "uvicorn", "matplotlib", "clip_benchmark", "webdataset"]

# Runs `siglip-dola` commands in one interpreter whose imports of the blocked modules fail; prints
# [[exit code, stderr], ...] and the optional modules that were imported after all.
RUNNER = r"""
import contextlib, importlib.abc, io, json, sys
config = json.loads(sys.argv[1])

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in config["block"]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Refuse())
# libraries probe optional modules with find_spec (transformers 4.x does for faiss): absent means None there
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in config["block"] else _find_spec(name, package))
sys.argv = ["siglip-dola"]
from siglip_dola.cli import main
results = []
for argv in config["commands"]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        results.append([main(argv), err.getvalue()])
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(config["watch"]))
print(json.dumps({"results": results, "loaded": loaded}))
"""


def run_cli(block: list[str], commands: list[list[str]], tmp_path: Path) -> dict:
    config = json.dumps({"block": block, "commands": commands, "watch": OPTIONAL})
    out = subprocess.run([sys.executable, "-c", RUNNER, config], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600, env={**_env(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_demo_classify_and_eval_run_without_any_optional_module(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    report = run_cli(OPTIONAL, [["demo", "--out", str(tmp_path / "demo"), "--n", "2"],
                                ["classify", str(tmp_path / "red.png"), "--labels", "red,blue"],
                                ["eval", "--dataset", "shapes", "--out", str(tmp_path / "e.json"), "--limit", "4"]],
                     tmp_path)
    assert [code for code, _ in report["results"]] == [0, 0, 0], report["results"]
    assert report["loaded"] == []                                   # the core imports none of them
    assert len(list((tmp_path / "demo").glob("*.png"))) == 2


def test_each_command_needing_a_missing_extra_exits_2_naming_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (20, 20), colour).save(images / f"{i}.png")
    index = str(tmp_path / "idx")
    import tarfile

    for shard in ("000000.tar", "000001.tar"):   # the shards exist: what is missing is the package that reads them
        with tarfile.open(tmp_path / shard, "w"):
            pass
    # the index is built with faiss present; serve then lacks starlette
    assert run_cli([], [["index", "build", str(images), "--out", index, "--quiet"]], tmp_path)["results"][0][0] == 0
    cases = {
        "faiss": (["index", "build", str(images), "--out", str(tmp_path / "idx2")], "retrieval"),
        "xxhash": (["index", "build", str(images), "--out", str(tmp_path / "idx3")], "retrieval"),
        "webdataset": (["eval", "--dataset", f"wds:{tmp_path}/{{000000..000001}}.tar", "--out",
                        str(tmp_path / "w.json")], "webdataset"),
        "matplotlib": (["eval", "--dataset", "shapes", "--out", str(tmp_path / "e.json"), "--limit", "4",
                        "--plots", str(tmp_path / "plots")], "plots"),
        "starlette": (["serve", index, "--port", "0"], "serve"),
        "uvicorn": (["serve", index, "--port", "0"], "serve"),
    }
    for module, (argv, extra) in cases.items():
        (code, err), = run_cli([module], [argv], tmp_path)["results"]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (module, err)
        assert module in lines[0] and f"pip install 'siglip-dola[{extra}]'" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "idx2").exists() and not (tmp_path / "plots").exists() and not (tmp_path / "e.json").exists()


def test_any_faiss_module_is_accepted_whatever_distribution_brought_it(tmp_path):
    """A faiss-gpu or conda build provides the module `faiss` without the faiss-cpu distribution: the check is the
    import, so a stand-in module named faiss (no distribution metadata at all) is what gets used."""
    (tmp_path / "faiss.py").write_text("MARK = 'not faiss-cpu'\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from siglip_dola.dependencies import require; "
              "print(require('faiss', 'retrieval').MARK)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         env={**_env(), "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.stdout.strip() == "not faiss-cpu", out.stderr
    assert "faiss-cpu" in " ".join(PYPROJECT["project"]["optional-dependencies"]["retrieval"])
    assert not any(d.startswith("faiss") for d in PYPROJECT["project"]["dependencies"])


def test_require_keeps_a_broken_dependency_of_the_module_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "fancy_optional.py").write_text("import not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        dependencies.require("fancy_optional", "plots")
    assert raised.value.name == "not_installed_anywhere" and not isinstance(raised.value, dependencies.MissingExtraError)


def _fake_dist(folder: Path, name: str, version: str, requires: list[str] = ()) -> None:
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_a_dependency_older_than_supported_fails_in_one_line(tmp_path):
    floor = dependencies.required_ranges()["transformers"]
    assert floor.startswith(">=")
    _fake_dist(tmp_path / "site", "transformers", "4.30.0")      # what --no-deps or conda can leave behind
    env = {**_env(), "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}"}
    library = subprocess.run([sys.executable, "-c", "import siglip_dola"], capture_output=True, text=True, env=env,
                             timeout=120)
    assert library.returncode == 1
    last = library.stderr.strip().splitlines()[-1]
    assert last.startswith("siglip_dola.dependencies.UnsupportedDependencyError: transformers 4.30.0 is installed")
    assert f"supports transformers{floor}" in last
    cli = subprocess.run([sys.executable, "-m", "siglip_dola", "shapes", "export", str(tmp_path / "s"), "--n", "1"],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "Traceback" not in cli.stderr
    assert "transformers 4.30.0 is installed" in cli.stderr and f"transformers{floor}" in cli.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("found, ok", [("4.38.2", True), ("5.25.0", True), ("4.38.1", False), ("4.57.0.dev0", True),
                                       ("2.5.1+cu121", False)])
def test_supported_range_check_reads_release_numbers(found, ok, monkeypatch):
    monkeypatch.setattr(dependencies, "required_ranges", lambda: {"transformers": ">=4.38.2"})
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: found)
    assert (dependencies.unsupported() == []) == ok


def test_ranges_of_an_installed_wheel_come_from_its_metadata(tmp_path, monkeypatch):
    """Without a pyproject.toml beside the package (an installed wheel), Requires-Dist is the source; extras'
    requirements (with a marker) are not core."""
    _fake_dist(tmp_path, "siglip_dola", "0.1.0", ["torch>=2.4.1", "numpy (>=1.24.4)",
                                                  "faiss-cpu>=1.8.0; extra == \"retrieval\""])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dependencies, "__file__", str(tmp_path / "elsewhere" / "siglip_dola" / "dependencies.py"))
    dependencies.required_ranges.cache_clear()
    try:
        assert dependencies.required_ranges() == {"torch": ">=2.4.1", "numpy": ">=1.24.4"}
    finally:
        dependencies.required_ranges.cache_clear()


def test_every_dependency_is_a_range_with_a_lower_bound_and_no_pin():
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    for requirement in requirements:
        if requirement.startswith("siglip-dola["):
            continue
        assert "==" not in requirement and "~=" not in requirement and ">=" in requirement, requirement
    assert dependencies.required_ranges() == dict(dependencies._split(r) for r in project["dependencies"])
    assert set(project["optional-dependencies"]["all"][0].split("[")[1].rstrip("]").split(",")) == \
        set(project["optional-dependencies"]) - {"all", "test"}


def test_version_is_written_once(capsys):
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "siglip_dola.version.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {siglip_dola.__version__}" in changelog and "## 0.1.0" in changelog
    from siglip_dola.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"siglip-dola {siglip_dola.__version__}"
