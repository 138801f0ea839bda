"""Crashes and small breaks of the command line (issue #26, 4 and 5): a port out of range, a reader that goes
away, serve's flags, defaults and warning prefix, help texts, pluralisation, and what each command imports."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_run import run

from siglip_dola.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded_index(tmp_path_factory):
    """A 3-image index of the embedded model (one segment)."""
    root = tmp_path_factory.mktemp("edges")
    assert main(["shapes", "export", str(root / "img"), "--n", "3"]) == 0
    assert main(["index", "build", str(root / "img"), "--out", str(root / "idx"), "--quiet"]) == 0
    return root / "idx"


def _python(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


def test_a_reader_that_goes_away_ends_the_command_quietly(embedded_index):
    process = _python("-m", "siglip_dola", "search", str(embedded_index), "a red circle", "--json")
    process.stdout.close()  # `| head` that has read enough: the command's first write meets a closed pipe
    _, err = process.communicate(timeout=600)
    assert process.returncode == 141, err
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"Exception ignored" not in err, err


def test_serve_port_out_of_range_is_an_argument_error(embedded_index, capsys):
    code, _, err = run(capsys, "serve", embedded_index, "--port", "99999")
    assert code == 2 and "--port: must be in 0..65535, got 99999" in err and "Traceback" not in err


def test_serve_has_the_settings_flags_with_their_defaults(capsys):
    code, out, _ = run(capsys, "serve", "--help")
    text = " ".join(out.split())
    for flag in ("--contrast-weight", "--bucket", "--n-buckets", "--calibration", "--static-layer"):
        assert flag in text
    assert "(default: the calibration's, else 0.1)" in text and "default 0.1)" not in text
    assert "default k on the page (default: 10)" in text and "default rerank-k on the page (default: 100)" in text


def test_serve_warns_with_the_command_prefix(embedded_index, capsys, monkeypatch):
    from siglip_dola.viewer import app

    monkeypatch.setattr(app, "run", lambda application, sock: sock.close())  # bind, warn, then stop at once
    code, out, err = run(capsys, "serve", embedded_index, "--host", "0.0.0.0", "--port", "0")
    assert code == 0 and "siglip-dola serve: warning: --host 0.0.0.0" in err


def test_the_api_says_where_each_value_came_from(embedded_index):
    from siglip_dola.loading import load
    from siglip_dola.retrieval import RerankConfig
    from siglip_dola.viewer.service import SearchService

    service = SearchService(embedded_index, load(None), RerankConfig(top_k=2, rerank_k=3), flags={"top_k"})
    answer = service.search_text("a red circle", service.parse())
    sources = answer["settings"]["sources"]
    assert (sources["top_k"], sources["rerank_k"], sources["mode"]) == ("flag", "default", "index")
    answer = service.search_text("a red circle", service.parse(k="1", rerank_k="2", mode="off"))
    assert answer["settings"]["sources"]["rerank_k"] == "request" == answer["settings"]["sources"]["mode"]


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_eval_help_says_what_limit_and_no_progress_do(capsys, command):
    _, out, _ = run(capsys, command, "--help")
    text = " ".join(out.split())
    assert "the first N of 'shapes'" in text and "uses all of it, with a warning" in text
    assert "(default: True)" not in text and "hide the progress bar (default: shown)" in text


@pytest.mark.parametrize("sub,listed", [("build", "embed images once and write a new index"),
                                        ("add", "add images not indexed yet to an existing index"),
                                        ("verify", "full integrity check: re-hash every file of an index")])
def test_index_subcommands_have_a_description(capsys, sub, listed):
    _, out, _ = run(capsys, "index", sub, "--help")
    assert " ".join(out.split("\n\n")[1].split()) == listed, out  # what `index --help` lists, under the usage


def test_one_segment_is_singular(embedded_index, capsys):
    code, out, _ = run(capsys, "index", "verify", embedded_index)
    assert code == 0 and "3 images, 1 segment," in out


def _imported(code: str) -> list[str]:
    script = textwrap.dedent(f"""
        import sys
        {code}
        heavy = ("torch", "transformers", "open_clip", "timm", "faiss", "starlette", "matplotlib", "webdataset",
                 "importlib.metadata", "numpy")
        print("imported:" + ",".join(m for m in heavy if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=True, cwd=REPO)
    line = [line for line in done.stdout.splitlines() if line.startswith("imported:")][-1]
    return [m for m in line[len("imported:"):].split(",") if m]


def test_help_imports_nothing_heavy():
    # started as the `siglip-dola` command, which checks dependency versions after parsing, not at import
    assert _imported("import sys; sys.argv[0] = 'siglip-dola'; from siglip_dola.cli import build_parser; "
                     "build_parser().format_help()") == []


def test_classify_on_the_embedded_model_imports_only_what_it_uses(tmp_path):
    from siglip_dola.data import shapes

    shapes.export(tmp_path, n=1)
    heavy = _imported(f"from siglip_dola.cli import main; main(['classify', {str(tmp_path / 'test_0_00000.png')!r}, "
                      "'--labels', 'red circle,blue square'])")
    assert {"torch", "transformers"} <= set(heavy)
    assert not {"open_clip", "timm", "faiss", "starlette", "matplotlib", "webdataset"} & set(heavy), heavy


def test_decode_threads_stay_within_the_cores(monkeypatch):
    import torch

    from siglip_dola.data import threads

    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with threads.main_process_threads(3) as cap:
            assert cap == 1 == torch.get_num_threads()  # 3 decode workers + this process = 4 cores
        assert torch.get_num_threads() == 4
        with threads.main_process_threads(0) as cap:
            assert cap == 4  # decoding in this process: nothing to share
    finally:
        torch.set_num_threads(before)


def test_eval_workers_run_one_torch_thread(tmp_path):
    """The decode workers' own thread count, read inside a worker through the preprocess they run."""
    import torch

    from siglip_dola.embedding.pixel_batches import _host_batches
    from siglip_dola.data import shapes

    items = [(s.name, s.image) for s in shapes.make_split("test", n=4)]

    def preprocess(image):
        return torch.full((3, 2, 2), float(torch.get_num_threads()))

    pieces = [p for _, parts in _host_batches(items, preprocess, 2, workers=1, pin=False) for p in parts]
    assert {float(v) for p in pieces for v in p.flatten()} == {1.0}
