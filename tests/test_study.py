"""`siglip-dola study` end to end on three sets the test writes (an ImageFolder with train/test, a flickr8k folder
with val/test Karpathy files, a single-split wds: pattern): the split policy, one result per dataset, the run
interrupted after the first dataset and resumed, the table, and the forest-plot page in Chromium."""
from __future__ import annotations

import csv
import json

import pytest

from browser import Chromium
from siglip_dola import cli
from siglip_dola.evaluation import study
from tests.dataset_files import write_flickr, write_image_folder, write_shards


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    write_image_folder(root / "folder", {"train": 25, "test": 12})
    write_flickr(root / "flickr", split="val", n=8)
    write_flickr(root / "flickr", split="test", n=10)
    write_shards(root / "shards", n=20, n_shards=3)
    return root, [str(root / "folder"), "flickr8k", f"wds:{root}/shards/{{000000..000002}}.tar"]


def study_argv(model_dir, root, names, out, *extra):
    return ["study", "--model", str(model_dir), "--datasets", ",".join(names), "--dataset-root", str(root / "flickr"),
            "--out", str(out), "--no-progress", "--n-resamples", "500", "--alphas", "0.1", "--n-buckets", "2",
            "--contrast-weights", "1", *extra]


def counting(monkeypatch, fail_at=None):
    """Wrap study.evaluate: count calls; raise KeyboardInterrupt (Ctrl-C) at call `fail_at`."""
    calls, real = [], study.evaluate

    def wrapped(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(study, "evaluate", wrapped)
    return calls


@pytest.fixture(scope="module")
def finished(sets, tiny_siglip_folder, tmp_path_factory):
    """A study interrupted in its second dataset, then resumed: (out dir, names, what each run did)."""
    root, names = sets
    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        first_calls = counting(patch, fail_at=2)
        assert cli.main(study_argv(tiny_siglip_folder, root, names, out)) == cli.EXIT_INTERRUPTED
    after_interrupt = sorted(p.name for p in (out / "results").iterdir())
    first_result = (out / "results" / f"{study.result_stem(names[0])}.json").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        resumed_calls = counting(patch)
        assert cli.main(study_argv(tiny_siglip_folder, root, names, out)) == 0
    return out, names, {"first": first_calls, "after_interrupt": after_interrupt, "first_result": first_result,
                        "resumed": resumed_calls}


def results_of(out, names) -> list[dict]:
    return [json.loads((out / "results" / f"{study.result_stem(n)}.json").read_text()) for n in names]


def test_interrupted_study_leaves_finished_results_only_and_resumes(finished):
    out, names, runs = finished
    assert runs["first"] == [names[0], "flickr8k"]  # Ctrl-C while the second dataset was being evaluated
    assert runs["after_interrupt"] == [f"{study.result_stem(names[0])}.json"]  # no partial or temp file
    assert runs["resumed"] == ["flickr8k", names[2]]  # the finished dataset is skipped
    assert (out / "results" / f"{study.result_stem(names[0])}.json").read_bytes() == runs["first_result"]


def test_each_dataset_calibrates_apart_from_its_test_split(finished):
    out, names, _ = finished
    folder, flickr, shards = results_of(out, names)
    assert (folder["split"], folder["calibrated_on"]["split"], folder["task"]) == ("test", "train[::5]", "zeroshot_classification")
    assert folder["calibrated_on"]["n_items"] == 5 and folder["n_images"] == 12  # 25 train items, every 5th
    assert (flickr["split"], flickr["calibrated_on"]["split"], flickr["task"]) == ("test", "val", "zeroshot_retrieval")
    assert (shards["split"], shards["calibrated_on"]["split"]) == ("all[rest of ::5]", "all[::5]")
    assert shards["n_images"] + shards["calibrated_on"]["n_items"] == 20
    for result in (folder, flickr, shards):
        calibration = json.loads(open(result["calibrated_on"]["calibration"]).read())
        assert calibration["split"] == result["calibrated_on"]["split"] != result["split"]
        assert result["settings"]["calibration"] == result["calibrated_on"]["calibration"]
        assert result["chosen_mode"] == calibration["choice"]["mode"]


def test_study_result_is_what_eval_gives_with_its_calibration(finished, sets, tiny_siglip_folder, tmp_path):
    out, names, _ = finished
    root, _ = sets
    flickr = results_of(out, names)[1]
    assert cli.main(["eval", "--model", str(tiny_siglip_folder), "--dataset", "flickr8k", "--dataset-root",
                     str(root / "flickr"), "--task", "retrieval", "--calibration", flickr["calibrated_on"]["calibration"],
                     "--n-resamples", "500", "--no-progress", "--out", str(tmp_path / "eval.json")]) == 0
    alone = json.loads((tmp_path / "eval.json").read_text())
    assert alone["modes"] == flickr["modes"] and alone["paired"] == flickr["paired"]


def test_table_has_one_row_per_dataset_with_the_paired_intervals(finished):
    out, names, _ = finished
    with open(out / "table.csv", newline="") as handle:
        rows = {row["dataset"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(names)
    for result in results_of(out, names):
        row = rows[result["dataset"]]
        for mode, paired in result["paired"].items():
            for key in ("delta", "ci_low", "ci_high", "mcnemar_p"):
                assert float(row[f"paired.{mode}.{key}"]) == pytest.approx(paired[key])
        assert row["calibrated_on.split"] == result["calibrated_on"]["split"]


def test_rerun_skips_everything_and_overwrite_redoes_it(finished, sets, tiny_siglip_folder, monkeypatch, capsys):
    out, names, _ = finished
    root, _ = sets
    calls = counting(monkeypatch)
    assert cli.main(study_argv(tiny_siglip_folder, root, names, out)) == 0
    printed = capsys.readouterr().out
    assert calls == [] and "kept 3 finished dataset(s)" in printed
    table = printed.splitlines()[1:]  # after the "kept" line
    assert table[0].split()[:3] == ["dataset", "task", "metric"] and [line.split()[0] for line in table[1:4]] == names
    assert cli.main(study_argv(tiny_siglip_folder, root, names[2:], out, "--overwrite")) == 0
    assert calls == [names[2]]
    assert cli.main(study_argv(tiny_siglip_folder, root, names, out)) == 0  # the page and table of all three again
    assert calls == [names[2]]


def test_a_failing_dataset_is_reported_and_the_others_finish(sets, tiny_siglip_folder, tmp_path, capsys):
    root, names = sets
    code = cli.main(study_argv(tiny_siglip_folder, root, ["flickr30k", names[2]], tmp_path / "s"))
    err = capsys.readouterr().err
    assert code == cli.EXIT_SKIPPED and "flickr30k" in err and "flickr30k_test_karpathy.txt" in err
    assert [p.name for p in (tmp_path / "s" / "results").iterdir()] == [f"{study.result_stem(names[2])}.json"]
    assert cli.main(study_argv(tiny_siglip_folder, root, ["flickr30k"], tmp_path / "t")) == cli.EXIT_ERROR


def test_dataset_lists_comma_or_file(tmp_path):
    (tmp_path / "list.txt").write_text("shapes  # the embedded set\n\n# a comment\ncifar10\nshapes\nwds:/a/{0..2}.tar\n")
    assert study.parse_dataset_list(f"@{tmp_path / 'list.txt'}") == ["shapes", "cifar10", "wds:/a/{0..2}.tar"]
    assert study.parse_dataset_list("a, b,,c") == ["a", "b", "c"]
    assert study.parse_dataset_list("wds:/s/{a,b}.tar,shapes") == ["wds:/s/{a,b}.tar", "shapes"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        study.parse_dataset_list(f"@{tmp_path / 'missing.txt'}")
    assert study.result_stem("shapes") == "shapes" and study.result_stem("wds:/a/{0..2}.tar").startswith("wds_a_0..2_.tar-")


def test_forest_plot_page_in_chromium(finished, tmp_path):
    out, names, _ = finished
    metric = lambda r: next(iter(r["paired"].values()))["metric"]  # noqa: E731
    results = sorted(results_of(out, names), key=metric)  # one forest plot per metric (acc1, then recall)
    with Chromium(width=1300, height=700) as browser:
        browser.open((out / "study.html").as_uri())
        rows = browser.evaluate("Array.from(document.querySelectorAll('.forest .frow')).map(g => ({"
                                "name: g.dataset.dataset, hollow: !!g.querySelector('circle.hollow'),"
                                "cx: +g.querySelector('circle').getAttribute('cx'),"
                                "ci: Array.from(g.querySelectorAll('line.ci')).map(l => [+l.getAttribute('x1'), +l.getAttribute('x2')])}))")
        browser_plots = browser.evaluate("document.querySelectorAll('svg.forest').length")
        zero = browser.evaluate("+document.querySelector('.forest line.zero').getAttribute('x1')")
        links = browser.evaluate("Array.from(document.querySelectorAll('.study a')).map(a => a.href)")
        browser.screenshot(tmp_path / "study.png")
        assert browser.errors() == [] and browser.requested_urls() == [(out / "study.html").as_uri()]
    assert [r["name"] for r in rows] == [r["dataset"] for r in results] and sorted(map(metric, results))[0] == "acc1"
    assert browser_plots == 2
    for row, result in zip(rows, results):
        shown = result["chosen_mode"] if result["chosen_mode"] != "off" else "dynamic"
        delta = result["paired"][shown]["delta"]
        assert row["hollow"] == (result["chosen_mode"] == "off")
        assert (row["cx"] > zero) == (delta > 0) and (row["cx"] < zero) == (delta < 0)
        low, high = row["ci"][0]
        assert low - 0.5 <= row["cx"] <= high + 0.5
    assert [link.rsplit("/", 1)[-1] for link in links] == [f"{study.result_stem(n)}.json" for n in names]


def test_study_under_torchrun_equals_one_process(finished, sets, tiny_siglip_folder, tmp_path):
    import os
    import sys
    from pathlib import Path

    from siglip_dola import distributed
    from tests.test_distributed import run_in_own_group

    out, names, _ = finished
    root, _ = sets
    picked = [names[0], names[2]]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master-port={distributed.free_port()}", "-m", "siglip_dola",
               *study_argv(tiny_siglip_folder, root, picked, tmp_path / "ranks")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = run_in_own_group(command, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("result(s) in") == 1  # rank 0 alone prints the table
    for sharded, alone in zip(results_of(tmp_path / "ranks", picked), results_of(out, picked)):
        metrics = lambda result: {mode: entry["metrics"] for mode, entry in result["modes"].items()}  # noqa: E731
        assert metrics(sharded) == metrics(alone) and sharded["paired"] == alone["paired"]
        assert sharded["calibrated_on"]["split"] == alone["calibrated_on"]["split"]
        assert sharded["settings"]["calibration"] == str(tmp_path / "ranks" / "calibrations" / Path(
            alone["settings"]["calibration"]).name)
