"""Partial or altered runs are never silent (issue #26, 2): skipped files make every command exit 1 and are
listed; every item failing is an error with grouped reasons; a split, limit, grid or interval that cannot be
honoured is refused or said; list flags parse like CSV; build and report name what they leave out."""
import csv
import json

import pytest
from cli_run import run

from siglip_dola import failures
from siglip_dola.cli.lists import split_list
from siglip_dola.data import datasets, shapes
from siglip_dola.evaluation import stats


@pytest.fixture(scope="module")
def mixed_csv(tmp_path_factory):
    """data.csv: 6 good shapes images, a missing row, a zero-byte .png and a text file named .jpg."""
    folder = tmp_path_factory.mktemp("mixed")
    shapes.export(folder / "img", split="val", n=6)
    (folder / "img" / "empty.png").write_bytes(b"")
    (folder / "img" / "text.jpg").write_text("not an image")
    rows = [row for row in csv.DictReader(open(folder / "img" / "labels.csv"))]
    with open(folder / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([f"img/{r['path']}", r["label"]] for r in rows)
        writer.writerows([["img/missing.png", rows[0]["label"]], ["img/empty.png", rows[1]["label"]],
                          ["img/text.jpg", rows[2]["label"]]])
    return folder


BAD = ("missing.png", "empty.png", "text.jpg")
FAST = ["--no-progress", "--workers", "0"]


def _listed(err: str) -> bool:
    return all(any(line.startswith("skipped ") and name in line for line in err.splitlines()) for name in BAD)


def test_eval_and_calibrate_exit_1_and_list_skipped_files(capsys, mixed_csv, tmp_path):
    code, _, err = run(capsys, "eval", "--dataset", mixed_csv / "data.csv", "--calibration", "none", *FAST,
                       "--n-resamples", "100", "--out", tmp_path / "r.json")
    assert code == 1 and _listed(err), err
    assert len(json.loads((tmp_path / "r.json").read_text())["skipped"]) == 3
    code, _, err = run(capsys, "calibrate", "--dataset", mixed_csv / "data.csv", "--no-progress",
                       "--alphas", "0.1", "--n-buckets", "3", "--contrast-weights", "1", "--out", tmp_path / "c.json")
    assert code == 1 and _listed(err), err


def test_every_item_failing_is_an_error_with_grouped_reasons(capsys, mixed_csv, tmp_path):
    bad = mixed_csv / "bad.csv"
    bad.write_text("path,label\nimg/empty.png,a\nimg/text.jpg,b\nimg/missing.png,a\nimg/missing2.png,b\n")
    for argv in (["eval", "--dataset", bad, "--calibration", "none", *FAST, "--out", tmp_path / "r.json"],
                 ["calibrate", "--dataset", bad, "--no-progress", "--out", tmp_path / "c.json"],
                 ["classify", mixed_csv / "img" / "empty.png", mixed_csv / "img" / "text.jpg", "--labels", "a,b"],
                 ["index", "build", mixed_csv / "img" / "empty.png", mixed_csv / "img" / "text.jpg",
                  "--out", tmp_path / "idx", "--quiet"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert "every one of the" in err and "environment" in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if ": error: " in line]) == 1, err


def test_grouped_reasons_count_one_cause_on_many_files():
    skipped = [(f"/data/{i}.png", f"FileNotFoundError: No such file: '/data/{i}.png'") for i in range(7)]
    skipped.append(("/data/x.png", "UnidentifiedImageError: cannot identify image file"))
    text = failures.grouped_reasons(skipped)
    assert text.startswith("7x \"FileNotFoundError: No such file: '<file>'\"") and "1x 'UnidentifiedImageError" in text


def test_a_csv_split_is_never_ignored(tmp_path, capsys):
    shapes.export(tmp_path / "img", n=4)
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\nimg/test_0_00000.png,red circle\nimg/test_0_00001.png,red square\n")
    code, _, err = run(capsys, "eval", "--dataset", plain, "--split", "test", "--out", tmp_path / "r.json")
    assert code == 2 and "no 'split' column" in err
    split = tmp_path / "split.csv"
    split.write_text("path,label,split\nimg/test_0_00000.png,red circle,val\nimg/test_0_00001.png,red square,test\n"
                     "img/test_0_00002.png,red triangle,test\n")
    test = datasets.load_dataset(str(split), split="test")
    assert test.split == "test" and [p.name for p in test.items] == ["test_0_00001.png", "test_0_00002.png"]
    assert test.classnames == ["red circle", "red square", "red triangle"]  # the same classes on every split
    with pytest.raises(ValueError, match="no rows of split 'train'"):
        datasets.load_dataset(str(split), split="train")


def test_a_limit_beyond_the_split_is_capped_and_said():
    with pytest.warns(UserWarning, match="more than the 1440 images"):
        dataset = datasets.load_dataset("shapes", split="test", n=99999999999999999999)
    assert len(dataset.items) == 1440 == len(dataset.labels) == len(dataset.captions)
    assert isinstance(dataset.items, shapes.ShapeItems)  # drawn when read, never all held in memory
    assert dataset.items[1439][0] == shapes.make_sample("test", 1439).name


def test_too_few_resamples_are_refused():
    with pytest.raises(ValueError, match="n_resamples must be an int >= 100"):
        stats.paired_comparison([0, 1, 1, 0], [1, 1, 0, 0], "acc1", n_resamples=1)


def test_cli_refuses_too_few_resamples_and_empty_grids(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--dataset", "shapes", "--n-resamples", "1", "--out", tmp_path / "r.json")
    assert code == 2 and "--n-resamples" in err and ">= 100" in err
    for flag in ("--contrast-weights", "--alphas", "--n-buckets"):
        code, _, err = run(capsys, "calibrate", "--dataset", "shapes", flag, "", "--out", tmp_path / "c.json")
        assert code == 2 and "empty" in err and flag in err, err
    with pytest.raises(ValueError, match="contrast_weights is empty"):
        from siglip_dola.evaluation.calibrate import CalibrationGrid
        CalibrationGrid(contrast_weights=())


def test_list_flags_parse_quotes_like_csv():
    assert split_list('"red, circle",blue square', "--labels", "x") == ["red, circle", "blue square"]
    assert split_list(' a , "b ""c""" ,', "--texts", "x") == ["a", 'b "c"']
    with pytest.raises(ValueError, match="--labels is empty"):
        split_list(" , ", "--labels", "x")


def test_classify_labels_with_commas_in_quotes(capsys, tmp_path):
    shapes.export(tmp_path, n=1)
    code, out, err = run(capsys, "classify", tmp_path / "test_0_00000.png", "--labels",
                         '"red, circle",blue square', "--json")
    assert code == 0, err
    items = {hit["item"] for hit in json.loads(out)["results"][0]["hits"]}
    assert items == {"red, circle", "blue square"}


def test_build_leaves_out_results_with_nan_metrics(capsys, tmp_path):
    good = {"dataset": "shapes", "model": "m", "task": "zeroshot_classification", "metrics": {"acc1": 0.5}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "nan.json").write_text(json.dumps({**good, "metrics": {"acc1": float("nan")}}))
    code, out, err = run(capsys, "build", tmp_path / "good.json", tmp_path / "nan.json", "--out", tmp_path / "t.csv")
    assert code == 1 and "nan.json" in err and "not finite" in err
    assert "nan" not in (tmp_path / "t.csv").read_text().lower()


def test_report_with_garbage_lines_says_so_and_exits_1(capsys, tmp_path):
    import test_report as fixtures  # the report tests' record builders (tests/ is on sys.path under pytest)

    ids = [f"test_0_{i:05d}" for i in range(len(fixtures.OUTCOME_PLAN))]
    records = fixtures.classification_records(ids, fixtures.OUTCOME_PLAN)
    predictions, result = tmp_path / "p.jsonl", tmp_path / "result.json"
    fixtures.write_jsonl(predictions, records)
    result.write_text(json.dumps(fixtures.classification_result(records, predictions)))
    assert run(capsys, "report", result, "--out", tmp_path / "clean.html")[0] == 0
    fixtures.write_jsonl(predictions, records, extra_lines=["garbage", '{"not": "a record"}'])
    code, _, err = run(capsys, "report", result, predictions, "--out", tmp_path / "r.html")
    assert code == 1 and "2 line(s)" in err and "not prediction records" in err, err
