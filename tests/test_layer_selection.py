"""Layer numbers are checked once, where settings are resolved (or where a public call receives raw numbers), by
the one rule (layers.checked_layers); the readout and score take the checked value as it is and only assert."""
import copy
import pickle

import pytest
import torch

from siglip_dola import layers as layer_rules
from siglip_dola import scoring
from siglip_dola.layers import LayerSelection, checked_layers, resolve_layers
from siglip_dola.scorer import DoLaSigLIP
from siglip_dola.settings import resolve_settings

NUM_LAYERS = 12   # tiny_loaded's vision depth


@pytest.fixture
def rule_calls(monkeypatch):
    """The number of times the rule's check ran (the real check, counted)."""
    calls = []
    check = layer_rules._check_numbers

    def counted(*args, **kwargs):
        calls.append(args[0])
        return check(*args, **kwargs)
    monkeypatch.setattr(layer_rules, "_check_numbers", counted)
    return calls


def _pixels(loaded, batch=2):
    return torch.rand(batch, 3, *loaded.readout.image_size, generator=torch.Generator().manual_seed(0))


def test_resolved_layers_are_checked_once_for_every_later_readout_and_score(tiny_loaded, rule_calls):
    settings = resolve_settings(NUM_LAYERS, layers=[4, 8, 10], calibration="none", warn=False)
    assert rule_calls == [[4, 8, 10]] and isinstance(settings.layers, LayerSelection)
    scorer = DoLaSigLIP(tiny_loaded, settings=settings)
    bank = torch.randn(5, tiny_loaded.readout.embed_dim)
    for _ in range(3):   # each call: one readout (z_final, z_layers) and one score
        result = scorer.score_pixels(_pixels(tiny_loaded), bank)
    z_final, z_layers = tiny_loaded.readout(_pixels(tiny_loaded), settings.layers)
    scoring.score(z_final, z_layers, bank, tiny_loaded.tau, settings)
    assert rule_calls == [[4, 8, 10]]   # never again after resolve_settings
    assert set(result.premature_layer.tolist()) <= {4, 8, 10}


def test_raw_numbers_at_a_public_call_go_through_the_rule_once_per_call(tiny_loaded, rule_calls):
    z_final, z_layers = tiny_loaded.readout(_pixels(tiny_loaded), [2, 6])
    assert len(rule_calls) == 1 and z_layers.shape[0] == 2
    scoring.score(z_final, z_layers, torch.randn(3, z_final.shape[-1]), tiny_loaded.tau, layers=[2, 6])
    assert len(rule_calls) == 2


@pytest.mark.parametrize("bad, error, says", [
    ([0, 4], ValueError, r"layers \[0\] out of range: valid layers are 1\.\.11"),
    ([12], ValueError, r"layers \[12\] out of range: valid layers are 1\.\.11 \(num_layers=12"),
    ([4, 4], ValueError, r"layers must not contain duplicates"),
    ([2.0], TypeError, r"layers must hold ints \(valid layers are 1\.\.11\), got float 2\.0"),
    ("4", TypeError, r"layers must be a sequence of ints in 1\.\.11"),
])
def test_a_bad_layer_list_is_one_clear_error_at_every_edge(tiny_loaded, bad, error, says):
    with pytest.raises(error, match=says):
        resolve_settings(NUM_LAYERS, layers=bad, calibration="none", warn=False)
    with pytest.raises(error, match=says):
        tiny_loaded.readout(_pixels(tiny_loaded), bad)
    with pytest.raises(error, match=says):
        DoLaSigLIP(tiny_loaded, layers=bad, calibration="none")


def test_score_names_layers_and_the_stacked_axis():
    z_final, z_layers, bank = torch.randn(2, 8), torch.randn(2, 2, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"layers \[0\] out of range: valid layers are >= 1"):
        scoring.score(z_final, z_layers, bank, 0.05, layers=[0, 2])
    with pytest.raises(ValueError, match=r"len\(layers\)=3 must equal the stacked layer axis"):
        scoring.score(z_final, z_layers, bank, 0.05, layers=resolve_layers(NUM_LAYERS, layers=[2, 4, 6]))


def test_a_selection_for_another_depth_is_checked_again():
    deep = resolve_layers(24, layers=[18, 20, 22])
    assert checked_layers(deep, 24) is deep and checked_layers(deep) is deep
    with pytest.raises(ValueError, match=r"layers \[18, 20, 22\] out of range: valid layers are 1\.\.11"):
        checked_layers(deep, NUM_LAYERS)


def test_a_selection_is_only_made_by_the_rule_and_is_read_only():
    selection = resolve_layers(NUM_LAYERS, layers=[6, 2])
    assert selection == [6, 2] and selection.num_layers == NUM_LAYERS
    with pytest.raises(TypeError, match="made by checked_layers"):
        LayerSelection([99])
    for mutate in (lambda s: s.append(99), lambda s: s.__setitem__(0, 99), lambda s: s.extend([99])):
        with pytest.raises(TypeError, match="read-only"):
            mutate(selection)
    for again in (copy.copy(selection), copy.deepcopy(selection), pickle.loads(pickle.dumps(selection))):
        assert type(again) is LayerSelection and again == [6, 2] and again.num_layers == NUM_LAYERS


def test_inner_calls_assert_on_unchecked_numbers(tiny_loaded):
    """Below the public edge nothing re-checks: an unchecked list there is a programming error, not user input."""
    with pytest.raises(AssertionError):
        tiny_loaded.readout._run(_pixels(tiny_loaded), [2, 6], {})


def test_a_hand_made_settings_value_is_checked_once_when_the_scorer_takes_it(tiny_loaded, rule_calls):
    from siglip_dola.settings import DoLaSettings

    hand_made = DoLaSettings(mode="dynamic", layers=[4, 8], static_layer=None, alpha=0.1, contrast_weight=1.0,
                             bucket=None, n_buckets=None)
    scorer = DoLaSigLIP(tiny_loaded, settings=hand_made)
    bank = torch.randn(5, tiny_loaded.readout.embed_dim)
    for _ in range(2):
        scorer.score_pixels(_pixels(tiny_loaded), bank)
    assert rule_calls == [[4, 8]] and scorer.settings.layers == [4, 8]
    with pytest.raises(ValueError, match=r"layers \[20\] out of range: valid layers are 1\.\.11"):
        DoLaSigLIP(tiny_loaded, settings=DoLaSettings(mode="dynamic", layers=[20], static_layer=None, alpha=0.1,
                                                      contrast_weight=1.0, bucket=None, n_buckets=None))
