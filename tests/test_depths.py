"""Defaults work for every depth the readout supports (issue #26, 4): shallow SigLIPs (6 and 8 layers, real HF
folders) run with no layer flag; layer hints name only flags the user passed (a calibration's values name
the calibration file)."""
import json
import math

import pytest
from cli_run import run
import torch
from transformers import SiglipModel

from tools import train_embedded as te
from siglip_dola.cli import flag_words
from siglip_dola.evaluation.calibrate import CalibrationGrid, grid_points
from siglip_dola.layers import default_layers
from siglip_dola.modes import MODES
from siglip_dola.settings import resolve_settings


@pytest.mark.parametrize("num_layers", range(2, 49))
def test_every_depth_has_valid_defaults(num_layers):
    for mode in MODES:
        layers, static = default_layers(num_layers, mode)
        assert all(1 <= j <= num_layers - 1 for j in layers)
        assert (mode != "off") == bool(layers)
        settings = resolve_settings(num_layers, mode=mode, warn=False)
        assert settings.layers == layers
        if settings.bucket is not None:  # a recorded bucket regenerates exactly these layers
            again = resolve_settings(num_layers, mode=mode, bucket=settings.bucket, n_buckets=settings.n_buckets,
                                     warn=False)
            assert again.layers == layers
    points = grid_points(CalibrationGrid(), num_layers)
    assert {p.mode for p in points} >= {"off", "static"}
    assert all(1 <= j <= num_layers - 1 for p in points for j in p.layers)


def test_the_design_note_default_is_unchanged_for_24_layers():
    assert default_layers(24, "dynamic") == ([18, 20, 22], None)
    assert default_layers(24, "static") == ([20], 20)


def _siglip_folder(root, num_layers: int):
    torch.manual_seed(num_layers)
    cfg = te.TrainConfig(vision_layers=num_layers, text_layers=1, hidden_size=16, num_heads=2, patch_size=16)
    model = SiglipModel(te.build_model_config(cfg, vocab_size=len(te.build_tokenizer()))).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    folder = root / f"siglip_{num_layers}"
    model.save_pretrained(folder, safe_serialization=True)
    te.build_tokenizer().save_pretrained(folder)
    te.build_image_processor().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("num_layers", [6, 8])
def test_shallow_siglip_folders_run_with_the_defaults(tmp_path, capsys, num_layers):
    folder = _siglip_folder(tmp_path, num_layers)
    code, out, err = run(capsys, "eval", "--model", folder, "--dataset", "shapes", "--limit", "6", "--no-progress",
                         "--workers", "0", "--n-resamples", "100", "--out", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["modes"]["dynamic"]["settings"]["layers"] == default_layers(num_layers, "dynamic")[0]
    image = tmp_path / "img"
    assert run(capsys, "shapes", "export", image, "--n", "1")[0] == 0
    code, out, err = run(capsys, "classify", image / "test_0_00000.png", "--labels", "red circle,blue square",
                         "--model", folder, "--mode", "dynamic")
    assert code == 0, err


def test_layers_from_a_calibration_name_the_file_not_a_flag(tmp_path):
    calibration = tmp_path / "calib.json"
    calibration.write_text(json.dumps({"model": "m", "dataset": "shapes", "split": "val",
                                       "choice": {"mode": "static", "static_layer": 30, "alpha": 0.1}}))
    with pytest.raises(ValueError) as raised:
        resolve_settings(12, calibration=str(calibration), model_id="m", warn=False)
    message = flag_words(str(raised.value), {"static_layer": "--static-layer", "bucket": "--bucket",
                                             "layers": "--layers", "n_buckets": "--n-buckets"})
    assert str(calibration) in message and "static layer 30" in message
    assert "--static-layer" not in message and "--bucket" not in message and "parity" not in message


def test_a_bad_bucket_hint_names_only_real_flags():
    with pytest.raises(ValueError) as raised:
        resolve_settings(6, bucket=3, n_buckets=3, warn=False)
    message = flag_words(str(raised.value), {"bucket": "--bucket", "n_buckets": "--n-buckets", "layers": "--layers"})
    assert "--bucket 3" in message and "--n-buckets 3" in message and "parity" not in message


def test_an_eval_bank_without_labels_gives_no_classify_hint(tmp_path, capsys):
    import numpy as np

    from siglip_dola.data.shapes import CLASSNAMES

    np.save(tmp_path / "bank.npy", np.random.default_rng(0).standard_normal((len(CLASSNAMES), 64)).astype("float32"))
    _, _, err = run(capsys, "eval", "--dataset", "shapes", "--limit", "2", "--bank", tmp_path / "bank.npy",
                    "--no-progress", "--workers", "0", "--out", tmp_path / "r.json")
    assert "--labels" not in err and "labels-file" not in err
