"""Datasets: shapes, ImageFolder, CSV (labels / captions), clip_benchmark prompts and the missing-package error."""
import json
import os
import sys

import pytest
from PIL import Image

from siglip_dola.data import datasets
from siglip_dola.data import shapes


def _image(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_shapes_matches_make_split():
    dataset = datasets.load_dataset("shapes", split="val", n=10)
    samples = shapes.make_split("val", n=10)
    assert [i for i, _ in dataset.items] == [s.name for s in samples]
    assert dataset.labels == [s.label for s in samples]
    assert dataset.classnames == shapes.CLASSNAMES and dataset.templates == shapes.TEMPLATES
    assert dataset.captions == [[s.caption] for s in samples]
    assert "zeroshot_retrieval" in dataset.tasks
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.load_dataset("shapes", split="dev")


def test_image_folder_with_and_without_split_folders(tmp_path):
    for split in ("val", "test"):
        for name in ("golden_retriever", "cat"):
            for k in range(3):
                _image(tmp_path / "data" / split / name / f"{k}.png")
    (tmp_path / "data" / "test" / "cat" / "notes.txt").write_text("not an image")
    dataset = datasets.load_dataset(str(tmp_path / "data"), split="test")
    assert dataset.split == "test" and dataset.classnames == ["cat", "golden retriever"]
    assert dataset.labels == [0, 0, 0, 1, 1, 1]
    assert all(p.parent.parent.name == "test" and p.suffix == ".png" for p in dataset.items)

    flat = datasets.load_dataset(str(tmp_path / "data" / "val"), split=None, n=2)
    assert flat.split == "all"  # no split folder and no split asked for: the whole folder
    assert flat.labels == [0, 1]  # evenly spaced: both classes kept
    with pytest.raises(ValueError, match="no split folder 'test'"):  # a split asked for is never the whole folder
        datasets.load_dataset(str(tmp_path / "data" / "val"), split="test")

    with pytest.raises(ValueError, match="no class sub-folders"):
        datasets.image_folder_dataset(tmp_path / "data" / "val" / "cat")


def test_csv_path_label_relative_to_csv(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png")
    (tmp_path / "list.csv").write_text("path,label\nimgs/a.png,dog\nimgs/b.png,cat\nimgs/missing.png,dog\n")
    dataset = datasets.load_dataset(str(tmp_path / "list.csv"))
    assert dataset.items == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png", tmp_path / "imgs" / "missing.png"]
    assert dataset.classnames == ["cat", "dog"] and dataset.labels == [1, 0, 1]
    assert dataset.tasks == ("zeroshot_classification",) and dataset.captions is None


def test_csv_captions_grouped_per_image(tmp_path):
    (tmp_path / "caps.csv").write_text("path,caption\na.png,a red thing\nb.png,a blue thing\na.png,something red\n")
    dataset = datasets.csv_dataset(tmp_path / "caps.csv")
    assert dataset.items == [tmp_path / "a.png", tmp_path / "b.png"]
    assert dataset.captions == [["a red thing", "something red"], ["a blue thing"]]
    assert dataset.tasks == ("zeroshot_retrieval",)


def test_csv_without_required_columns(tmp_path):
    (tmp_path / "bad.csv").write_text("file,class\na.png,dog\n")
    with pytest.raises(ValueError, match="'path' and 'label'"):
        datasets.load_dataset(str(tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        datasets.load_dataset(str(tmp_path / "nope.csv"))


def test_bad_n():
    with pytest.raises(ValueError, match="n must be"):
        datasets.evenly_spaced(datasets.shapes_dataset("val", n=4), 0)


def test_missing_clip_benchmark_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # makes `import clip_benchmark...` fail
    monkeypatch.setitem(sys.modules, "clip_benchmark.datasets", None)
    with pytest.raises(ImportError, match="pip install"):
        datasets.clip_benchmark_prompts("cifar10")
    with pytest.raises(RuntimeError, match="not 'shapes', an existing folder or a .csv file.*pip install"):
        datasets.load_dataset("cifar10")


def test_clip_benchmark_prompts_match_packaged_files():
    cb_datasets = pytest.importorskip("clip_benchmark.datasets")  # optional extra: siglip-dola[clip_benchmark]
    folder = os.path.dirname(cb_datasets.__file__)
    with open(os.path.join(folder, "en_classnames.json")) as handle:
        classnames = json.load(handle)
    with open(os.path.join(folder, "en_zeroshot_classification_templates.json")) as handle:
        templates = json.load(handle)
    names, prompts = datasets.clip_benchmark_prompts("eurosat")
    assert names == classnames["eurosat"]
    assert prompts == [t.replace("{c}", "{}") for t in templates["eurosat"]]
    assert all("{}" in t and "{c}" not in t for t in prompts)
    names, prompts = datasets.clip_benchmark_prompts("cifar10")
    assert names is None  # torchvision provides cifar10's class names with the data
    assert prompts[0] == templates["cifar10"][0].replace("{c}", "{}")
    names, prompts = datasets.clip_benchmark_prompts("vtab/some_unknown_set")  # falls back like clip_benchmark
    assert prompts == [t.replace("{c}", "{}") for t in templates["imagenet1k"]]
    with pytest.raises(ValueError, match="language"):
        datasets.clip_benchmark_prompts("eurosat", language="xx")
