"""tools/embedded_report.py: the report is calibrate + eval (same numbers as the result JSON), tables and README markers."""
import ast
import json
import shutil
from pathlib import Path

import pytest

from siglip_dola.data import shapes
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.loading import load
from tools import embedded_report as report
from tools import train_embedded as te

N_VAL, N_TEST = 36, 72


@pytest.fixture(scope="module")
def checkpoint(tiny_siglip_folder, tmp_path_factory):
    """The tiny model folder (conftest) with a training record, as tools/train_embedded.py leaves it."""
    folder = tmp_path_factory.mktemp("tiny_checkpoint") / "model"
    shutil.copytree(tiny_siglip_folder, folder)
    te.write_training_record(folder, te.TrainConfig(vision_layers=12, text_layers=1, hidden_size=16, num_heads=2,
                                                    patch_size=16), 1.0, "test machine")
    return folder


def test_report_is_calibrate_plus_eval(checkpoint, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.MARKERS[0]}\nold table\n{report.MARKERS[1]}\noutro\n")
    metrics, table = report.write_report(checkpoint, readme=readme, progress=False, n_val=N_VAL, n_test=N_TEST)
    calibration = json.loads((checkpoint / "calibration.json").read_text())
    shipped = json.loads((checkpoint / report.RESULTS_NAME).read_text())
    independent = evaluate(load(str(checkpoint), device="cpu"), "shapes", split="test", n=N_TEST,
                           calibration=checkpoint / "calibration.json", progress=False)
    assert calibration["split"] == "val" and calibration["n_images"] == N_VAL
    for mode in ("off", "static", "dynamic"):
        assert shipped["modes"][mode] == independent["modes"][mode]
        assert metrics["zero_shot"]["modes"][mode]["top1"] == independent["modes"][mode]["metrics"]["acc1"]
        assert f"{independent['modes'][mode]['metrics']['acc1']:.3f} [" in table
    assert shipped["paired"] == independent["paired"] and shipped["predictions"] is None
    samples = shapes.make_split("test", n=N_TEST)
    held = [s for s in samples if shapes.CLASSNAMES[s.label] in shapes.HELD_OUT]
    assert metrics["zero_shot"]["n_test_held_out"] == len(held)
    assert metrics["zero_shot"]["layer_top1"]["12"] == independent["modes"]["off"]["metrics"]["acc1"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text and table in text
    card = (checkpoint / "MODEL_CARD.md").read_text()
    assert table in card and report.COMMAND in card
    paired = independent["paired"]["static"]
    assert f"{paired['delta']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]" in table


def test_held_out_and_attribute_accuracy_from_rows():
    held_class = sorted(shapes.HELD_OUT)[0]
    seen_class = next(c for c in shapes.CLASSNAMES if c not in shapes.HELD_OUT)

    def row(true, predicted):
        entry = {"top5": [{"label": predicted, "index": shapes.CLASSNAMES.index(predicted)}]}
        return {"label": true, "label_index": shapes.CLASSNAMES.index(true), "modes": {"off": entry}}
    colour, shape = held_class.split()
    other_colour = next(c for c in shapes.COLOURS if c != colour)
    rows = [row(held_class, held_class), row(held_class, f"{other_colour} {shape}"), row(seen_class, seen_class)]
    assert report.held_out_top1(rows) == {"off": 0.5}
    assert report.attribute_accuracy(rows) == {"colour_correct": pytest.approx(2 / 3), "shape_correct": 1.0}


def test_update_readme_needs_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, "| table |")


def test_the_repo_readme_has_the_markers_and_the_report_never_imports_training_code():
    assert all(marker in report.README.read_text() for marker in report.MARKERS)
    tree = ast.parse(Path(report.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("train_embedded" in name for name in imported)
