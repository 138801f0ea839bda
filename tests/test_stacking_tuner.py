"""The stacking tuner's decisions: when it measures, what it keeps (memory and an atomic cache file keyed by the
device name), and that an explicit stacked_max_batch always wins. The measurement itself is a fake `run` here:
no timing is asserted, only which variants were run and that the kept choice is the recorded one."""
from __future__ import annotations

import json

import pytest
import torch

from siglip_dola import config
from siglip_dola.readout import stacking_tuner as tuner


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("SIGLIP_DOLA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuner, "_tunable", lambda images: True)
    monkeypatch.setattr(tuner, "_device_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(tuner, "stream_capturing", lambda device: False)
    monkeypatch.setattr(tuner, "_CHOICES", {})
    with config.override(stacked_tuning=True):   # opt-in until timed on a GPU
        yield tmp_path / "cache" / "stacking.json"


def _runner(calls: list):
    def run(limit):
        calls.append((limit, config.get("stacked_max_batch")))   # the limit is also what the pooler reads
    return run


def test_first_call_measures_both_ways_then_the_choice_is_reused(fake_gpu):
    images, calls = torch.zeros(8, 3, 4, 4), []
    limit = tuner.stacked_limit(images, [2, 4], ("open_clip", 24, 1152, "folded"), _runner(calls))
    assert sorted({c[0] for c in calls}) == [0, 8] and len(calls) == 2 * (1 + tuner.ROUNDS)
    assert all(limit_seen == requested for requested, limit_seen in calls)
    record = next(iter(json.loads(fake_gpu.read_text()).values()))
    assert limit == (8 if record["stack"] else 0)
    assert record["stack"] == (record["stacked_ms"] < record["per_layer_ms"])
    key = next(iter(json.loads(fake_gpu.read_text())))
    assert key.startswith("Fake GPU 80GB|") and "layers 2" in key and "[8, 3, 4, 4]" in key
    calls.clear()
    assert tuner.stacked_limit(images, [2, 4], ("open_clip", 24, 1152, "folded"), _runner(calls)) == limit
    assert calls == []                                   # this process: from memory
    tuner._CHOICES.clear()                               # a new process: from the file, no measurement
    assert tuner.stacked_limit(images, [2, 4], ("open_clip", 24, 1152, "folded"), _runner(calls)) == limit
    assert calls == []


def test_other_batches_models_and_devices_are_measured_apart(fake_gpu, monkeypatch):
    calls = []
    tuner.stacked_limit(torch.zeros(4, 3, 4, 4), [1], ("timm", 12, 768, "folded"), _runner(calls))
    tuner.stacked_limit(torch.zeros(5, 3, 4, 4), [1], ("timm", 12, 768, "folded"), _runner(calls))
    tuner.stacked_limit(torch.zeros(4, 3, 4, 4), [1], ("timm", 24, 768, "folded"), _runner(calls))
    monkeypatch.setattr(tuner, "_device_name", lambda device: "Other GPU")
    tuner.stacked_limit(torch.zeros(4, 3, 4, 4), [1], ("timm", 12, 768, "folded"), _runner(calls))
    assert len(json.loads(fake_gpu.read_text())) == 4 and len(calls) == 4 * 2 * (1 + tuner.ROUNDS)


@pytest.mark.parametrize("case", ["batch_1", "batch_17", "no_layers", "explicit", "tuning_off", "capturing", "cpu"])
def test_the_config_is_left_alone_where_the_tuner_does_not_decide(fake_gpu, monkeypatch, case):
    batch = {"batch_1": 1, "batch_17": 17}.get(case, 8)
    layers = [] if case == "no_layers" else [3]
    options = {"explicit": {"stacked_max_batch": 8}, "tuning_off": {"stacked_tuning": False}}.get(case, {})
    if case == "capturing":
        monkeypatch.setattr(tuner, "stream_capturing", lambda device: True)
    if case == "cpu":
        monkeypatch.undo()
        monkeypatch.setattr(tuner, "_CHOICES", {})
    calls = []
    with config.override(**options):
        assert tuner.stacked_limit(torch.zeros(batch, 3, 4, 4), layers, ("x",), _runner(calls)) is None
    assert calls == []


def test_tuning_is_off_unless_asked_for():
    assert config.get("stacked_tuning") is False


def test_a_corrupt_cache_file_is_measured_again_and_rewritten(fake_gpu):
    fake_gpu.parent.mkdir(parents=True)
    fake_gpu.write_text("{not json")
    calls = []
    tuner.stacked_limit(torch.zeros(2, 3, 4, 4), [1], ("x",), _runner(calls))
    assert calls and len(json.loads(fake_gpu.read_text())) == 1


def test_explicit_settings_are_told_apart_from_defaults():
    assert not config.is_set("stacked_max_batch")
    with config.override(stacked_max_batch=config.get("stacked_max_batch")):   # the default value, but given
        assert config.is_set("stacked_max_batch")
    assert not config.is_set("stacked_max_batch")
