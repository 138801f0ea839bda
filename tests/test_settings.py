"""siglip_dola.settings: flags > calibration > defaults, each value's source, the embedded default, one stderr line."""
import json

import pytest

from siglip_dola import settings as settings_module
from siglip_dola.layers import default_layers
from siglip_dola.loading.embedded import EMBEDDED_CALIBRATION
from siglip_dola.settings import DoLaSettings, resolve_settings

CALIBRATION = {"model": "m", "dataset": "shapes", "split": "val",
               "choice": {"mode": "static", "static_layer": 6, "alpha": 0.2, "contrast_weight": 0.5},
               "best": {"static": {"mode": "static", "static_layer": 6, "alpha": 0.2, "contrast_weight": 0.5},
                        "dynamic": {"mode": "dynamic", "bucket": 1, "n_buckets": 4, "alpha": 0.05,
                                    "contrast_weight": 0.25},
                        "off": {"mode": "off"}}}


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(CALIBRATION))
    return path


@pytest.fixture(autouse=True)
def fresh_warning(monkeypatch):
    monkeypatch.setattr(settings_module, "_warned_uncalibrated", False)


def test_defaults_are_the_design_note_and_say_so(capsys):
    s = resolve_settings(24, model_id="m")
    assert s.to_json() == {"mode": "dynamic", "layers": [18, 20, 22], "static_layer": None, "alpha": 0.1,
                           "contrast_weight": 1.0, "bucket": 3, "n_buckets": 3, "calibration": None,
                           "sources": {"mode": "default", "alpha": "default", "contrast_weight": "default",
                                       "layers": "default"}}
    resolve_settings(24, model_id="m")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DoLa is uncalibrated" in err and "siglip-dola calibrate --model m" in err


def test_calibration_applies_and_flags_win(calibration_file, capsys):
    s = resolve_settings(24, calibration=calibration_file, model_id="m")
    assert (s.mode, s.layers, s.static_layer, s.alpha, s.contrast_weight) == ("static", [6], 6, 0.2, 0.5)
    assert set(s.sources.values()) == {"calibration"} and s.calibration == str(calibration_file)
    flagged = resolve_settings(24, calibration=calibration_file, model_id="m", alpha=0.3, contrast_weight=1.0)
    assert (flagged.alpha, flagged.contrast_weight, flagged.static_layer) == (0.3, 1.0, 6)
    assert flagged.sources == {"mode": "calibration", "alpha": "flag", "contrast_weight": "flag",
                               "layers": "calibration"}
    layers = resolve_settings(24, calibration=calibration_file, model_id="m", static_layer=10)
    assert layers.layers == [10] and layers.sources["layers"] == "flag"
    assert capsys.readouterr().err == ""  # calibrated: no warning


def test_flag_mode_takes_that_modes_best_entry(calibration_file):
    s = resolve_settings(24, calibration=calibration_file, model_id="m", mode="dynamic")
    assert (s.layers, s.bucket, s.n_buckets, s.alpha, s.contrast_weight) == ([2, 4, 6], 1, 4, 0.05, 0.25)
    assert s.sources == {"mode": "flag", "alpha": "calibration", "contrast_weight": "calibration",
                         "layers": "calibration"}
    off = resolve_settings(24, calibration=calibration_file, model_id="m", mode="off")
    assert off.layers == [] and off.mode == "off"


def test_calibration_for_another_model_is_refused(calibration_file):
    with pytest.raises(ValueError, match="made for model 'm', not 'other'"):
        resolve_settings(24, calibration=calibration_file, model_id="other")


@pytest.mark.parametrize("text, error, match", [
    ("missing.json", FileNotFoundError, "no such file.*embedded"),
    ("bad.json", ValueError, "not a calibration JSON"),
    ("nochoice.json", ValueError, "'choice' object"),
])
def test_bad_calibration_files_get_clear_errors(tmp_path, text, error, match):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nochoice.json").write_text("{}")
    with pytest.raises(error, match=match):
        resolve_settings(24, calibration=tmp_path / text)


def test_embedded_name_is_the_shipped_file():
    shipped = json.loads(EMBEDDED_CALIBRATION.read_text())
    s = resolve_settings(24, calibration="embedded", model_id="embedded")
    assert s.calibration == "embedded" and s.mode == shipped["choice"]["mode"]
    assert s.alpha == shipped["choice"].get("alpha", 0.1)
    assert s.contrast_weight == shipped["choice"].get("contrast_weight", 1.0)
    none = resolve_settings(24, calibration="none", model_id="embedded", warn=False)
    assert none.calibration is None and none.layers == [18, 20, 22]


def test_inherited_settings_keep_their_sources_and_candidates():
    stored = DoLaSettings("dynamic", [2, 4, 6], None, 0.2, 0.5, None, None,
                          {"mode": "calibration", "layers": "calibration", "alpha": "calibration",
                           "contrast_weight": "flag"}, "embedded")
    s = resolve_settings(8, inherited=stored)
    assert (s.layers, s.alpha, s.contrast_weight, s.sources, s.calibration) == \
        ([2, 4, 6], 0.2, 0.5, stored.sources, "embedded")
    static = resolve_settings(8, inherited=stored, mode="static")
    assert static.layers == [4] and static.sources["mode"] == "flag"  # the middle of the inherited candidates
    assert DoLaSettings.from_json(s.to_json()) == s


@pytest.mark.parametrize("flags, match", [
    ({"alpha": 0.0}, "alpha"), ({"contrast_weight": -1.0}, "contrast_weight"), ({"mode": "greedy"}, "mode"),
    ({"layers": [24]}, "out of range"),
    ({"mode": "static", "static_layer": 99}, "static_layer 99 out of range"),
    ({"mode": "dynamic", "static_layer": 4}, "only used with mode='static'"),
])
def test_bad_flags_name_the_argument(flags, match):
    with pytest.raises(ValueError, match=match):
        resolve_settings(24, warn=False, **flags)


def test_default_layers_policy():
    assert default_layers(24, "dynamic") == ([18, 20, 22], None)
    assert default_layers(24, "static") == ([20], 20)
    assert default_layers(24, "off") == ([], None)
    assert default_layers(24, "off", bucket=1) == ([2, 4, 6, 8], None)
    assert default_layers(24, "dynamic", bucket=4, n_buckets=4) == ([20, 22], None)
    assert default_layers(24, "static", static_layer=7) == ([7], 7)
    assert default_layers(24, "static", layers=[4, 10], static_layer=6) == ([6], 6)  # static_layer wins over layers
    assert default_layers(8, "static", static_layer=3) == ([3], 3)  # needs no bucket of its own


def test_the_embedded_model_defaults_to_its_shipped_calibration_everywhere(capsys):
    from siglip_dola.loading import load
    from siglip_dola.retrieval.search import RerankConfig  # noqa: F401  (imports cleanly with settings)
    from siglip_dola.scorer import DoLaSigLIP

    model = load(device="cpu")
    assert model.calibration == "embedded"
    shipped = json.loads(EMBEDDED_CALIBRATION.read_text())["choice"]
    scorer = DoLaSigLIP(model)
    assert scorer.settings.calibration == "embedded" and set(scorer.settings.sources.values()) == {"calibration"}
    assert (scorer.settings.mode, scorer.settings.alpha, scorer.settings.contrast_weight) == \
        (shipped["mode"], shipped["alpha"], shipped["contrast_weight"])
    assert DoLaSigLIP.from_calibration("embedded", model).settings == scorer.settings
    assert DoLaSigLIP(model, alpha=0.2).settings.sources["alpha"] == "flag"
    plain = DoLaSigLIP(model, calibration="none")
    assert plain.settings.layers == [18, 20, 22] and plain.settings.calibration is None
    assert capsys.readouterr().err.count("DoLa is uncalibrated") == 1
