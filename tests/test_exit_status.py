"""The README's exit-status rule, for every command, each given one bad file (issue #26, 6):
0 success; 1 finished, with each skipped input listed on stderr as 'skipped PATH: REASON'; 2 an error, as
one 'siglip-dola CMD: error: ...' line and no traceback."""
import json

import pytest
from cli_run import run

from siglip_dola.cli import SUBCOMMANDS, main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit_status")
    assert main(["shapes", "export", str(root / "img"), "--n", "4"]) == 0
    (root / "img" / "broken.png").write_bytes(b"\x89PNG nope")
    rows = (root / "img" / "labels.csv").read_text().splitlines()
    (root / "data.csv").write_text("\n".join([rows[0], *[f"img/{r}" for r in rows[1:]], "img/broken.png,red circle"]))
    assert main(["shapes", "export", str(root / "more"), "--n", "2", "--seed", "3"]) == 0
    (root / "more" / "bad.jpg").write_text("text, not a jpeg")
    assert main(["index", "build", *[str(p) for p in sorted((root / "img").glob("test_*.png"))],
                 "--out", str(root / "idx"), "--quiet"]) == 0
    result = {"dataset": "shapes", "model": "m", "task": "zeroshot_classification", "metrics": {"acc1": 0.5}}
    (root / "good.json").write_text(json.dumps(result))
    (root / "bad.json").write_text("{not json")
    return root


def skipped_runs(data, tmp):
    """(command, argv, the one bad file) for every command that reads a batch of input files."""
    img, broken = data / "img", data / "img" / "broken.png"
    return [
        ("classify", ["classify", img, "--labels", "red circle,blue square"], broken),
        ("rerank", ["rerank", img, "--texts", "a red circle,a blue square"], broken),
        ("rerank --query", ["rerank", img, "--query", "a red circle"], broken),
        ("index build", ["index", "build", img, "--out", tmp / "new.idx", "--quiet"], broken),
        ("index add", ["index", "add", tmp / "added.idx", data / "more", "--quiet"], data / "more" / "bad.jpg"),
        ("eval", ["eval", "--dataset", data / "data.csv", "--no-progress", "--workers", "0", "--n-resamples", "100",
                  "--out", tmp / "r.json"], broken),
        ("calibrate", ["calibrate", "--dataset", data / "data.csv", "--no-progress", "--alphas", "0.1",
                       "--n-buckets", "3", "--contrast-weights", "1", "--out", tmp / "c.json"], broken),
        ("build", ["build", data / "good.json", data / "bad.json", "--out", tmp / "t.csv"], data / "bad.json"),
    ]


def test_one_bad_input_file_exits_1_and_is_listed(data, tmp_path, capsys):
    import shutil

    shutil.copytree(data / "idx", tmp_path / "added.idx")
    for name, argv, bad in skipped_runs(data, tmp_path):
        code, out, err = run(capsys, *argv)
        listed = [line for line in err.splitlines() if line.startswith("skipped ") and bad.name in line]
        assert code == 1 and len(listed) == 1, (name, code, err)
        assert "Traceback" not in err and bad.name not in out.replace("skipped", ""), name


def test_report_with_one_bad_line_exits_1(data, tmp_path, capsys):
    argv = ["eval", "--dataset", "shapes", "--limit", "4", "--no-progress", "--workers", "0", "--n-resamples", "100",
            "--out", tmp_path / "r.json", "--predictions", tmp_path / "p.jsonl"]
    assert run(capsys, *argv)[0] == 0
    with open(tmp_path / "p.jsonl", "a") as handle:
        handle.write("{broken line\n")
    code, _, err = run(capsys, "report", tmp_path / "r.json", "--out", tmp_path / "r.html")
    assert code == 1 and "line 5" in err and "Traceback" not in err


def error_runs(data, tmp):
    """(command, argv) for every command given one bad file where a file is its whole input."""
    (tmp / "corrupt.idx").mkdir()
    (tmp / "corrupt.idx" / "manifest.json").write_text("{not json")
    (tmp / "a_file").write_text("x")
    (tmp / "garbage.csv").write_bytes(b"\x00\x01 not a table")
    return [
        ("search", ["search", "--captions", data / "bad.json", "--image", data / "img" / "broken.png"]),
        ("search index", ["search", tmp / "corrupt.idx", "a red circle"]),
        ("serve", ["serve", tmp / "corrupt.idx", "--port", "0"]),
        ("index verify", ["index", "verify", tmp / "corrupt.idx"]),
        ("report", ["report", data / "bad.json", "--out", tmp / "x.html"]),
        ("shapes", ["shapes", "export", tmp / "a_file", "--n", "1"]),
        ("demo", ["demo", "--model", tmp / "a_file", "--out", tmp / "demo"]),
        ("classify", ["classify", data / "img" / "broken.png", "--labels", "a,b"]),
        ("eval", ["eval", "--dataset", tmp / "garbage.csv", "--out", tmp / "r.json"]),
        ("calibrate", ["calibrate", "--dataset", tmp / "missing.csv", "--out", tmp / "c.json"]),
        ("build", ["build", data / "bad.json", "--out", tmp / "t.csv"]),
        ("study", ["study", "--datasets", tmp / "garbage.csv", "--out", tmp / "study"]),
        ("rerank", ["rerank", data / "img" / "broken.png", "--texts", "a,b"]),
        ("index build", ["index", "build", data / "img" / "broken.png", "--out", tmp / "one.idx"]),
        ("index add", ["index", "add", tmp / "corrupt.idx", data / "img"]),
    ]


def test_a_bad_file_as_the_whole_input_is_one_error_line(data, tmp_path, capsys):
    runs = error_runs(data, tmp_path)
    assert {name.split()[0] for name, _ in runs} == set(SUBCOMMANDS)  # every command is covered
    for name, argv in runs:
        code, out, err = run(capsys, *argv)
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (name, code, err)
        assert errors[0].startswith(f"siglip-dola {argv[0]}"), (name, errors)
