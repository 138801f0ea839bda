"""Tests for siglip_dola.scoring against scipy and naive per-example python loops."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, softmax
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from siglip_dola import scoring

LN2 = math.log(2.0)
FAST = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- independent references
def ref_jsd(p, q):
    """Squared scipy Jensen-Shannon distance (natural log); 0 where scipy's rounding gives NaN."""
    return np.nan_to_num(jensenshannon(p, q, axis=-1)) ** 2


def ref_select(q_final, q_layers, layers):
    """Per example: first layer (in `layers` order) with the strictly largest scipy JSD."""
    premature = np.empty(q_final.shape[0], dtype=np.int64)
    for b in range(q_final.shape[0]):
        best, best_value = None, -1.0
        for j, layer in enumerate(layers):
            value = ref_jsd(q_final[b], q_layers[j, b])
            if value > best_value:
                best, best_value = layer, value
        premature[b] = best
    return premature


def ref_contrast(q_final, q_early, alpha):
    """One example: p_hat over V_head = {c: q_N(c) >= alpha max q_N}, softmax of log(q_N / q_M)."""
    keep = [c for c in range(len(q_final)) if q_final[c] >= alpha * max(q_final)]
    contrast = np.array([math.log(q_final[c] / q_early[c]) for c in keep])
    p_hat = np.zeros(len(q_final))
    p_hat[keep] = softmax(contrast)
    return p_hat


def ref_official_table(q_final, q_layers):
    """The official DoLa code's per-example value: 0.5 * (KL(M||P) + KL(M||Q)) / C, as a loop."""
    table = np.empty(q_layers.shape[:2])
    for j in range(q_layers.shape[0]):
        for b in range(q_final.shape[0]):
            p, q = q_final[b], q_layers[j, b]
            m = 0.5 * (p + q)
            kl = lambda x: np.mean(np.where(m > 0, m * (np.log(m) - np.log(x)), 0.0))  # noqa: E731
            table[j, b] = 0.5 * (kl(p) + kl(q))
    return table


def random_logits(rng, *shape, scale=3.0):
    return rng.normal(size=shape) * scale


def distributions(min_classes=1, max_classes=12, min_weight=0.0):
    """Strategy: a pair (p, q) of float64 distributions over the same 1..12 classes; zeros allowed
    unless min_weight > 0 (drawn positive rather than filtered, which hypothesis' health check rejects)."""
    weights = st.floats(min_weight, 1.0, allow_subnormal=False)
    def normalised(w):  # an all-but-zero draw gets mass on class 0 rather than being filtered out
        w = w if w.sum() > 1e-3 else np.concatenate([[1.0], w[1:]])
        return w / w.sum()
    return st.integers(min_classes, max_classes).flatmap(lambda c: st.tuples(
        arrays(np.float64, c, elements=weights), arrays(np.float64, c, elements=weights),
    )).map(lambda pq: (normalised(pq[0]), normalised(pq[1])))


# ---------------------------------------------------------------- jsd
@given(distributions())
@FAST
def test_jsd_matches_scipy_symmetric_and_bounded(pq):
    p, q = pq
    value = scoring.jsd(p, q)
    assert abs(value - ref_jsd(p, q)) < 1e-6
    assert scoring.jsd(q, p) == pytest.approx(value, abs=1e-12)
    assert 0.0 <= value <= LN2


@given(distributions())
@FAST
def test_jsd_zero_iff_equal(pq):
    p, q = pq
    assert scoring.jsd(p, p) < 1e-12
    if np.abs(p - q).sum() > 1e-3:
        assert scoring.jsd(p, q) > 0


def test_jsd_batched_and_disjoint_support_is_ln2():
    rng = np.random.default_rng(0)
    p, q = softmax(random_logits(rng, 2, 3, 50), -1), softmax(random_logits(rng, 2, 3, 50), -1)
    np.testing.assert_allclose(scoring.jsd(p, q), ref_jsd(p, q), atol=1e-9)
    assert scoring.jsd(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(LN2, abs=1e-12)


# ---------------------------------------------------------------- select_early_exit
@pytest.mark.parametrize("seed", range(3))
def test_select_early_exit_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    layers = [18, 20, 22, 12]
    q_final = softmax(random_logits(rng, 6, 9), -1)
    q_layers = softmax(random_logits(rng, 4, 6, 9), -1)
    premature, table = scoring.select_early_exit(q_final, q_layers, layers)
    np.testing.assert_array_equal(premature, ref_select(q_final, q_layers, layers))
    np.testing.assert_allclose(table, ref_jsd(q_final[None], q_layers), atol=1e-9)
    assert premature.dtype == np.int64 and table.shape == (4, 6)


def test_select_early_exit_tie_goes_to_earliest_listed_layer():
    q_final = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    twin = np.array([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]])
    q_layers = np.stack([q_final, twin, twin])  # layers 20 and 4 tie exactly; 10 equals q_N
    premature, table = scoring.select_early_exit(q_final, q_layers, [10, 20, 4])
    assert table[1].tolist() == table[2].tolist()
    np.testing.assert_array_equal(premature, [20, 20])
    premature, _ = scoring.select_early_exit(q_final, q_layers[[0, 2, 1]], [10, 4, 20])
    np.testing.assert_array_equal(premature, [4, 4])


def test_select_early_exit_torch_any_leading_dims():
    rng = np.random.default_rng(3)
    q_final = softmax(random_logits(rng, 2, 3, 5), -1)
    q_layers = softmax(random_logits(rng, 2, 2, 3, 5), -1)
    premature, table = scoring.select_early_exit(torch.tensor(q_final), torch.tensor(q_layers), [2, 4])
    assert isinstance(premature, torch.Tensor) and premature.dtype == torch.int64 and premature.shape == (2, 3)
    flat = ref_select(q_final.reshape(6, 5), q_layers.reshape(2, 6, 5), [2, 4])
    np.testing.assert_array_equal(premature.numpy().reshape(6), flat)


# ---------------------------------------------------------------- contrast_and_mask
@given(distributions(min_weight=1e-6), st.floats(0.01, 1.0))
@FAST
def test_contrast_sums_to_one_on_v_head_and_zero_elsewhere(pq, alpha):
    q_final, q_early = pq
    assert (q_final > 0).all() and (q_early > 0).all()
    p_hat, log_p_hat = scoring.contrast_and_mask(q_final, q_early, alpha)
    threshold = alpha * q_final.max()
    clear = np.abs(q_final - threshold) > 1e-9 * threshold  # skip classes on the rounding boundary
    assert p_hat.sum() == pytest.approx(1.0, abs=1e-12)
    assert (p_hat[clear & (q_final < threshold)] == 0).all()
    assert np.isneginf(log_p_hat[p_hat == 0]).all()
    assert (p_hat[clear & (q_final > threshold)] > 0).all()
    if clear.all():
        np.testing.assert_allclose(p_hat, ref_contrast(q_final, q_early, alpha), atol=1e-12)


@given(distributions(), st.floats(0.01, 1.0))
@FAST
def test_contrast_with_uniform_early_layer_renormalises_q_final(pq, alpha):
    q_final = pq[0]
    uniform = np.full_like(q_final, 1.0 / q_final.size)
    p_hat, _ = scoring.contrast_and_mask(q_final, uniform, alpha)
    kept = np.where(p_hat > 0, q_final, 0.0)
    np.testing.assert_allclose(p_hat, kept / kept.sum(), atol=1e-12)


def test_contrast_zero_q_m_on_kept_class_splits_mass_equally():
    q_final = np.array([[0.4, 0.35, 0.2, 0.05], [0.5, 0.3, 0.2, 0.0]])
    q_early = np.array([[0.0, 0.5, 0.0, 0.5], [0.6, 0.4, 0.0, 0.0]])
    p_hat, log_p_hat = scoring.contrast_and_mask(q_final, q_early, alpha=0.2)
    np.testing.assert_array_equal(p_hat, [[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert not np.isnan(log_p_hat).any()


def test_contrast_alpha_one_keeps_only_the_maximum():
    p_hat, _ = scoring.contrast_and_mask(np.array([0.2, 0.5, 0.3]), np.array([0.1, 0.1, 0.8]), alpha=1.0)
    np.testing.assert_array_equal(p_hat, [0.0, 1.0, 0.0])


# ---------------------------------------------------------------- dola and score
def ref_dola(scores_final, scores_layers, layers, alpha):
    q_final, q_layers = softmax(scores_final, -1), softmax(scores_layers, -1)
    premature = ref_select(q_final, q_layers, layers)
    p_hat = np.stack([ref_contrast(q_final[b], q_layers[layers.index(m), b], alpha) for b, m in enumerate(premature)])
    return p_hat, premature


@pytest.mark.parametrize("seed, alpha", [(0, 0.1), (1, 0.05), (2, 0.5)])
def test_dola_dynamic_matches_naive_loop(seed, alpha):
    rng = np.random.default_rng(seed)
    layers = [2, 4, 6, 8]
    scores_final, scores_layers = random_logits(rng, 5, 11), random_logits(rng, 4, 5, 11)
    result = scoring.dola(scores_final, scores_layers, layers, alpha=alpha)
    p_hat, premature = ref_dola(scores_final, scores_layers, layers, alpha)
    np.testing.assert_array_equal(result.premature_layer, premature)
    np.testing.assert_allclose(result.probs, p_hat, atol=1e-12)
    np.testing.assert_allclose(result.final_probs, softmax(scores_final, -1), atol=1e-12)
    np.testing.assert_allclose(result.jsd, ref_jsd(softmax(scores_final, -1)[None], softmax(scores_layers, -1)), atol=1e-9)


@given(arrays(np.float64, (3, 6), elements=st.floats(-20, 20)), arrays(np.float64, (1, 3, 6), elements=st.floats(-20, 20)))
@FAST
def test_static_equals_dynamic_with_one_candidate(scores_final, scores_layers):
    dynamic = scoring.dola(scores_final, scores_layers, [7])
    static = scoring.dola(scores_final, scores_layers, None, mode="static", static_layer=7)
    np.testing.assert_array_equal(static.probs, dynamic.probs)
    np.testing.assert_array_equal(static.premature_layer, dynamic.premature_layer)


def test_static_uses_the_named_layer_for_every_example():
    rng = np.random.default_rng(4)
    scores_final, scores_layers = random_logits(rng, 3, 8), random_logits(rng, 3, 3, 8)
    result = scoring.dola(scores_final, scores_layers, [2, 4, 6], mode="static", static_layer=4)
    np.testing.assert_array_equal(result.premature_layer, [4, 4, 4])
    alone = scoring.dola(scores_final, scores_layers[1:2], None, mode="static", static_layer=4)
    np.testing.assert_allclose(result.probs, alone.probs, atol=1e-12)


def test_mode_off_returns_q_final_and_still_reports_jsd():
    rng = np.random.default_rng(5)
    scores_final, scores_layers = random_logits(rng, 2, 5), random_logits(rng, 2, 2, 5)
    result = scoring.dola(scores_final, scores_layers, [3, 5], mode="off")
    np.testing.assert_allclose(result.probs, softmax(scores_final, -1), atol=1e-12)
    np.testing.assert_array_equal(result.premature_layer, [-1, -1])
    assert result.jsd.shape == (2, 2)
    bare = scoring.dola(scores_final, None, None, mode="off")
    assert bare.jsd.shape == (0, 2) and (bare.premature_layer == -1).all()


def test_dola_tie_in_dynamic_mode_uses_earliest_listed_layer():
    scores_final = np.array([[3.0, 0.0, -1.0]])
    early = np.array([[0.0, 0.0, 3.0]])
    result = scoring.dola(scores_final, np.stack([early, early]), [16, 10])
    np.testing.assert_array_equal(result.premature_layer, [16])


def test_score_composes_rep_logits_and_dola():
    rng = np.random.default_rng(6)
    z_final, z_layers, bank = rng.normal(size=(3, 16)), rng.normal(size=(2, 3, 16)), rng.normal(size=(7, 16))
    tau = 0.07
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    logits_final, logits_layers = unit(z_final) @ unit(bank).T / tau, unit(z_layers) @ unit(bank).T / tau
    result = scoring.score(z_final, z_layers, bank, tau, [10, 12])
    p_hat, premature = ref_dola(logits_final, logits_layers, [10, 12], 0.1)
    np.testing.assert_allclose(result.probs, p_hat, atol=1e-9)
    np.testing.assert_array_equal(result.premature_layer, premature)
    np.testing.assert_allclose(scoring.build_probs_from_rep(z_final, bank, tau), softmax(logits_final, -1), atol=1e-12)
    np.testing.assert_allclose(scoring.build_log_probs_from_rep(z_final, bank, tau), log_softmax(logits_final, -1), atol=1e-9)


# ---------------------------------------------------------------- compat="official-dola"
def compat_case():
    """Example 0 wants layer 2 (large JSD); examples 1, 2 want layer 4 (small JSD)."""
    scores_final = np.array([[5.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    layer_2 = np.array([[0.0, 0.0, 5.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    layer_4 = np.array([[5.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 2.0]])
    return scores_final, np.stack([layer_2, layer_4])


def test_compat_official_chooses_one_layer_for_the_batch():
    scores_final, scores_layers = compat_case()
    default = scoring.dola(scores_final, scores_layers, [2, 4])
    official = scoring.dola(scores_final, scores_layers, [2, 4], compat="official-dola")
    np.testing.assert_array_equal(default.premature_layer, [2, 4, 4])
    np.testing.assert_array_equal(official.premature_layer, [2, 2, 2])
    assert not np.allclose(default.probs, official.probs)


def test_compat_official_reproduces_the_kl_m_p_value_and_batch_mean():
    rng = np.random.default_rng(7)
    q_final = softmax(random_logits(rng, 4, 6), -1)
    q_layers = softmax(random_logits(rng, 3, 4, 6), -1)
    premature, table = scoring.select_early_exit(q_final, q_layers, [8, 6, 4], compat="official-dola")
    reference = ref_official_table(q_final, q_layers)
    np.testing.assert_allclose(table, reference, atol=1e-12)
    assert (premature == [8, 6, 4][int(np.argmax(reference.mean(1)))]).all()
    assert not np.allclose(table, ref_jsd(q_final[None], q_layers))


def test_unknown_compat_is_rejected():
    scores_final, scores_layers = compat_case()
    with pytest.raises(ValueError, match="compat"):
        scoring.dola(scores_final, scores_layers, [2, 4], compat="official")


# ---------------------------------------------------------------- numerical stability and array kinds
def assert_valid(result):
    for field in (result.probs, result.log_probs, result.final_probs, result.jsd):
        assert not torch.isnan(torch.as_tensor(field)).any()
    np.testing.assert_allclose(np.asarray(result.probs, dtype=np.float64).sum(-1), 1.0, atol=1e-5)
    assert ((np.asarray(result.jsd) >= 0) & (np.asarray(result.jsd) <= LN2)).all()


def test_single_class():
    result = scoring.dola(np.array([[3.0]]), np.array([[[-2.0]]]), [5])
    assert_valid(result)
    assert result.probs.tolist() == [[1.0]] and result.jsd.tolist() == [[0.0]]


def test_two_hundred_thousand_classes_with_logits_of_1e4():
    rng = np.random.default_rng(8)
    scores_final = torch.from_numpy(rng.uniform(-1e4, 1e4, size=(2, 200_000)).astype(np.float32))
    scores_layers = torch.from_numpy(rng.uniform(-1e4, 1e4, size=(2, 2, 200_000)).astype(np.float32))
    result = scoring.dola(scores_final, scores_layers, [2, 4])
    assert_valid(result)
    assert result.probs.dtype == torch.float32


def test_extreme_logits_opposite_peaks_give_ln2():
    scores_final = np.array([[1e4, -1e4, -1e4], [-1e4, 1e4, 1e4]])
    scores_layers = np.stack([-scores_final, scores_final])
    result = scoring.dola(scores_final, scores_layers, [2, 4])
    assert_valid(result)
    np.testing.assert_allclose(result.jsd[0], [LN2, LN2], atol=1e-9)
    np.testing.assert_array_equal(result.premature_layer, [2, 2])
    np.testing.assert_array_equal(result.probs, [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])


def test_zeros_in_probabilities_give_no_nan():
    q_final = np.array([[0.6, 0.4, 0.0, 0.0]])
    q_layers = np.array([[[0.0, 0.0, 0.5, 0.5]], [[0.6, 0.0, 0.4, 0.0]]])
    premature, table = scoring.select_early_exit(q_final, q_layers, [3, 9])
    np.testing.assert_allclose(table, ref_jsd(q_final[None], q_layers), atol=1e-12)
    assert premature.tolist() == [3]
    p_hat, log_p_hat = scoring.contrast_and_mask(q_final, q_layers[1], alpha=0.1)
    assert not np.isnan(p_hat).any() and not np.isnan(log_p_hat).any()
    np.testing.assert_array_equal(p_hat, [[0.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype):
    rng = np.random.default_rng(9)
    scores_final = torch.from_numpy(random_logits(rng, 3, 10)).to(dtype)
    scores_layers = torch.from_numpy(random_logits(rng, 2, 3, 10)).to(dtype)
    result = scoring.dola(scores_final, scores_layers, [4, 6])
    assert_valid(result)
    assert result.probs.dtype == torch.float32
    reference = scoring.dola(scores_final.double().numpy(), scores_layers.double().numpy(), [4, 6])
    np.testing.assert_array_equal(result.premature_layer.numpy(), reference.premature_layer)
    np.testing.assert_allclose(result.probs.numpy(), reference.probs, atol=1e-5)


def test_numpy_in_numpy_out_and_torch_in_torch_out():
    rng = np.random.default_rng(10)
    scores_final, scores_layers = random_logits(rng, 2, 4), random_logits(rng, 2, 2, 4)
    as_numpy = scoring.dola(scores_final, scores_layers, [2, 4])
    as_torch = scoring.dola(torch.tensor(scores_final), torch.tensor(scores_layers), [2, 4])
    for field in ("probs", "log_probs", "final_probs", "premature_layer", "jsd"):
        assert isinstance(getattr(as_numpy, field), np.ndarray)
        assert isinstance(getattr(as_torch, field), torch.Tensor)
        np.testing.assert_allclose(getattr(as_torch, field).numpy(), getattr(as_numpy, field))
    assert isinstance(scoring.jsd(softmax(scores_final, -1), softmax(scores_final, -1)), np.ndarray)
    assert isinstance(scoring.contrast_and_mask(torch.ones(3) / 3, torch.ones(3) / 3)[0], torch.Tensor)
    assert isinstance(scoring.build_probs_from_rep(np.ones((2, 4), np.float32), np.eye(4), 1.0), np.ndarray)


# ---------------------------------------------------------------- bad input names the argument
RNG = np.random.default_rng(11)
SF, SL = random_logits(RNG, 2, 4), random_logits(RNG, 2, 2, 4)
QN, QL = softmax(SF, -1), softmax(SL, -1)
Z, BANK = RNG.normal(size=(2, 8)), RNG.normal(size=(4, 8))
NAN_SF = np.where(np.arange(4) == 1, np.nan, SF)
NAN_Q = np.where(np.arange(4) == 1, np.nan, QN)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        scoring.contrast_and_mask(QN, QL[0], alpha)
    with pytest.raises(ValueError, match="alpha"):
        scoring.dola(SF, SL, [2, 4], alpha=alpha)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_tau_raises(tau):
    with pytest.raises(ValueError, match="tau"):
        scoring.build_log_probs_from_rep(Z, BANK, tau)
    with pytest.raises(ValueError, match="tau"):
        scoring.score(Z, Z[None], BANK, tau, [3])


BAD_CALLS = {
    "bank dim != z dim": (lambda: scoring.build_probs_from_rep(Z, BANK[:, :5], 1.0), ValueError, "text_bank"),
    "empty text bank": (lambda: scoring.build_probs_from_rep(Z, BANK[:0], 1.0), ValueError, "text_bank"),
    "1-d text bank": (lambda: scoring.build_probs_from_rep(Z, BANK[0], 1.0), ValueError, "text_bank"),
    "NaN in z": (lambda: scoring.build_probs_from_rep(np.full((2, 8), np.nan), BANK, 1.0), ValueError, "z"),
    "NaN in text bank": (lambda: scoring.build_probs_from_rep(Z, np.full((4, 8), np.nan), 1.0), ValueError, "text_bank"),
    "NaN in z_layers": (lambda: scoring.score(Z, np.full((1, 2, 8), np.nan), BANK, 1.0, [3]), ValueError, "z_layers"),
    "z_layers shape": (lambda: scoring.score(Z, Z, BANK, 1.0, [3]), ValueError, "z_layers"),
    "list instead of array": (lambda: scoring.build_probs_from_rep([[1.0]], BANK, 1.0), TypeError, "z"),
    "bool tau": (lambda: scoring.build_probs_from_rep(Z, BANK, True), TypeError, "tau"),
    "empty classes": (lambda: scoring.dola(SF[:, :0], SL[:, :, :0], [2, 4]), ValueError, "scores_final"),
    "NaN in scores_final": (lambda: scoring.dola(NAN_SF, SL, [2, 4]), ValueError, "scores_final"),
    "NaN in scores_layers": (lambda: scoring.dola(SF, SL + NAN_SF * 0, [2, 4]), ValueError, "scores_layers"),
    "inf in scores_final": (lambda: scoring.dola(SF + np.inf, SL, [2, 4]), ValueError, "scores_final"),
    "NaN in p": (lambda: scoring.jsd(NAN_Q, QN), ValueError, "p"),
    "NaN in q": (lambda: scoring.jsd(QN, NAN_Q), ValueError, "q"),
    "negative q": (lambda: scoring.jsd(QN, -QN), ValueError, "q"),
    "jsd class mismatch": (lambda: scoring.jsd(QN, QN[:, :3]), ValueError, "p and q"),
    "jsd shapes don't broadcast": (lambda: scoring.jsd(QN, QL[:, :1].repeat(3, 1)), ValueError, "p and q"),
    "NaN in q_N": (lambda: scoring.contrast_and_mask(NAN_Q, QN), ValueError, "q_N"),
    "NaN in q_M": (lambda: scoring.contrast_and_mask(QN, NAN_Q), ValueError, "q_M"),
    "all-zero q_N": (lambda: scoring.contrast_and_mask(QN * 0, QN), ValueError, "q_N"),
    "q_M shape": (lambda: scoring.contrast_and_mask(QN, QN[:1]), ValueError, "q_M"),
    "bool alpha": (lambda: scoring.contrast_and_mask(QN, QN, True), TypeError, "alpha"),
    "empty layers": (lambda: scoring.select_early_exit(QN, QL[:0], []), ValueError, "layers"),
    "duplicate layers": (lambda: scoring.select_early_exit(QN, QL, [4, 4]), ValueError, "duplicates"),
    "layers length != J": (lambda: scoring.select_early_exit(QN, QL, [2, 4, 6]), ValueError, "layers"),
    "bool layer": (lambda: scoring.select_early_exit(QN, QL, [True, 4]), TypeError, "layers"),  # the one rule: layers.py
    "non-positive layer": (lambda: scoring.select_early_exit(QN, QL, [0, 4]), ValueError, "layers"),
    "layers is None": (lambda: scoring.select_early_exit(QN, QL, None), TypeError, "layers"),
    "q_layers not [J, *q_N.shape]": (lambda: scoring.select_early_exit(QN, QL[:, :1], [2, 4]), ValueError, "q_layers"),
    "q_layers missing J axis": (lambda: scoring.select_early_exit(QN, QN, [2, 4]), ValueError, "q_layers"),
    "NaN in q_layers": (lambda: scoring.select_early_exit(QN, QL + NAN_Q * 0, [2, 4]), ValueError, "q_layers"),
    "scores_layers shape": (lambda: scoring.dola(SF, SL[:, :, :3], [2, 4]), ValueError, "scores_layers"),
    "duplicate dola layers": (lambda: scoring.dola(SF, SL, [2, 2]), ValueError, "layers"),
    "unknown mode": (lambda: scoring.dola(SF, SL, [2, 4], mode="greedy"), ValueError, "dynamic"),
    "static without static_layer": (lambda: scoring.dola(SF, SL, [2, 4], mode="static"), ValueError, "static_layer"),
    "static_layer not in layers": (lambda: scoring.dola(SF, SL, [2, 4], mode="static", static_layer=6), ValueError, "static_layer"),
    "dynamic without scores_layers": (lambda: scoring.dola(SF, None, [2, 4]), ValueError, "scores_layers"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(case):
    call, error, name = BAD_CALLS[case]
    with pytest.raises(error, match=name):
        call()


def test_layers_may_be_numpy_or_torch_int_arrays():
    expected = scoring.select_early_exit(QN, QL, [6, 2])[0]
    np.testing.assert_array_equal(scoring.select_early_exit(QN, QL, np.array([6, 2]))[0], expected)
    np.testing.assert_array_equal(scoring.select_early_exit(QN, QL, torch.tensor([6, 2]))[0], expected)


def test_mode_off_accepts_an_empty_layer_stack():
    result = scoring.score(Z, np.zeros((0, 2, 8)), BANK, 0.1, None, mode="off")
    np.testing.assert_allclose(result.probs, scoring.build_probs_from_rep(Z, BANK, 0.1), atol=1e-12)
    assert result.jsd.shape == (0, 2) and (result.premature_layer == -1).all()
    with pytest.raises(ValueError, match="layers"):
        scoring.score(Z, np.zeros((0, 2, 8)), BANK, 0.1, [], mode="dynamic")


# ---------------------------------------------------------------- host syncs: one value read per call, at its end
class HostReads(TorchDispatchMode):
    """Records every aten op, the ops that read a tensor's value on the host (a GPU sync), host->device copies
    of Python data (torch.tensor, also a sync on CUDA), and Python-level reads invisible on CPU (tolist, numpy)."""

    READ_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero", "aten.equal",
                "aten.masked_select", "aten.unique", "aten._unique2"}

    def __init__(self):
        super().__init__()
        self.ops, self.reads, self.uploads = [], [], []
        self.python_reads = PythonReads(self.reads)

    def __enter__(self):
        self.python_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.python_reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.ops.append(name)
        bool_index = name == "aten.index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in self.READ_OPS or bool_index:
            self.reads.append(name)
        if name == "aten.lift_fresh":
            self.uploads.append(name)
        return func(*args, **(kwargs or {}))


class PythonReads(TorchFunctionMode):
    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tolist", "numpy", "cpu"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def count_host_reads(call):
    call()  # warm-up: the layer-number table is built (uploaded) once per device
    with HostReads() as counter:
        call()
    return counter


def torch_case(num_layers, batch=4, classes=10, dim=8):
    gen = torch.Generator().manual_seed(num_layers)
    z_final, z_layers = torch.randn(batch, dim, generator=gen), torch.randn(num_layers, batch, dim, generator=gen)
    return z_final, z_layers, torch.randn(classes, dim, generator=gen), list(range(1, num_layers + 1))


def test_host_read_counter_sees_every_kind_of_read():
    values = torch.tensor([1.0, float("nan")])
    for read in (lambda: bool(values[0]), lambda: values[1].item(), lambda: values.tolist(), lambda: values.numpy(),
                 lambda: values[values > 0], lambda: torch.nonzero(values), lambda: torch.isnan(values).any().cpu()):
        with HostReads() as counter:
            read()
        assert len(counter.reads) == 1, counter.reads
    with HostReads() as counter:
        torch.tensor([18, 20, 22])
    assert counter.uploads == ["aten.lift_fresh"]


@pytest.mark.parametrize("num_layers", [3, 23])
@pytest.mark.parametrize("mode, options", [("dynamic", {}), ("static", {"static_layer": 2}), ("off", {}),
                                           ("dynamic", {"compat": "official-dola"})])
def test_score_and_dola_read_the_device_once(num_layers, mode, options):
    z_final, z_layers, bank, layers = torch_case(num_layers)
    counter = count_host_reads(lambda: scoring.score(z_final, z_layers, bank, 0.05, layers, mode=mode, **options))
    assert counter.reads == ["aten._local_scalar_dense"] and counter.uploads == []
    assert counter.ops[-1] == "aten._local_scalar_dense"  # the validity check comes after all the math
    logits_final, logits_layers = z_final @ bank.T, z_layers @ bank.T
    counter = count_host_reads(lambda: scoring.dola(logits_final, logits_layers, layers, mode=mode, **options))
    assert counter.reads == ["aten._local_scalar_dense"] and counter.uploads == []


def test_probability_functions_read_the_device_once():
    z_final, z_layers, bank, layers = torch_case(3)
    q_final, q_layers = torch.softmax(z_final @ bank.T, -1), torch.softmax(z_layers @ bank.T, -1)
    for call in (lambda: scoring.select_early_exit(q_final, q_layers, layers), lambda: scoring.contrast_and_mask(q_final, q_layers[0]),
                 lambda: scoring.jsd(q_final, q_layers), lambda: scoring.build_log_probs_from_rep(z_final, bank, 0.05)):
        counter = count_host_reads(call)
        assert counter.reads == ["aten._local_scalar_dense"] and counter.uploads == []


@pytest.mark.parametrize("bad", ["z_final", "z_layers", "text_bank"])
def test_nan_is_still_reported_by_name_after_the_single_read(bad):
    z_final, z_layers, bank, layers = torch_case(3)
    tensors = {"z_final": z_final, "z_layers": z_layers, "text_bank": bank}
    tensors[bad] = tensors[bad].clone()
    tensors[bad].view(-1)[3] = float("nan") if bad != "text_bank" else float("inf")
    with HostReads() as counter, pytest.raises(ValueError, match=bad):
        scoring.score(tensors["z_final"], tensors["z_layers"], tensors["text_bank"], 0.05, layers)
    assert counter.reads == ["aten._local_scalar_dense"]
    with pytest.raises(ValueError, match="scores_layers"):
        scoring.dola(z_final @ bank.T, (tensors["z_layers"] @ bank.T) if bad == "z_layers" else torch.full((3, 4, 10), -math.inf), layers)


def test_score_without_validation_marks_nonfinite_rows_and_defers_the_error():
    """validate=False (the CUDA-graph path) reads nothing on the host: NaN/inf rows are flagged, not raised."""
    generator = torch.Generator().manual_seed(3)
    z_final, bank = torch.randn(4, 8, generator=generator), torch.randn(5, 8, generator=generator)
    z_layers = torch.randn(2, 4, 8, generator=generator)
    clean = scoring.score(z_final, z_layers, bank, 0.1, [2, 4])
    deferred = scoring.score(z_final, z_layers, bank, 0.1, [2, 4], validate=False)
    assert clean.nonfinite is None and not deferred.nonfinite.any()
    torch.testing.assert_close(deferred.probs, clean.probs)
    scoring.check_finite(deferred)                                         # nothing to raise
    z_layers[1, 2, 0] = float("nan")                                  # row 2 of layer 4
    with pytest.raises(ValueError, match="z_layers must be finite"):
        scoring.score(z_final, z_layers, bank, 0.1, [2, 4])
    flagged = scoring.score(z_final, z_layers, bank, 0.1, [2, 4], validate=False)
    assert flagged.nonfinite.tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="1 row"):
        scoring.check_finite(flagged)
    with pytest.raises(TypeError, match="validate must be True or False"):
        scoring.score(z_final, z_layers, bank, 0.1, [2, 4], validate=1)
