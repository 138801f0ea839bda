"""Paired statistics vs scipy (binomtest, bootstrap) and statsmodels (exact McNemar) on constructed cases."""
import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar

from siglip_dola.evaluation import stats


def _pairs(both: int, fixed: int, broken: int, neither: int, seed: int = 0):
    """off, mode 0/1 arrays with the given cell counts, shuffled."""
    off = np.array([1] * both + [0] * fixed + [1] * broken + [0] * neither, dtype=bool)
    mode = np.array([1] * both + [1] * fixed + [0] * broken + [0] * neither, dtype=bool)
    order = np.random.default_rng(seed).permutation(off.size)
    return off[order], mode[order]


@pytest.mark.parametrize("fixed,broken", [(0, 0), (3, 3), (1, 0), (0, 7), (12, 5), (40, 25), (300, 250), (5, 41)])
def test_mcnemar_exact_matches_statsmodels_and_binomtest(fixed, broken):
    ours = stats.mcnemar_exact_p(fixed, broken)
    table = [[10, broken], [fixed, 7]]  # rows: off right / wrong; columns: mode right / wrong
    assert ours == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9, abs=1e-15)
    if fixed + broken:
        assert ours == pytest.approx(scipy_stats.binomtest(fixed, fixed + broken, 0.5).pvalue, rel=1e-9, abs=1e-15)
    else:
        assert ours == 1.0


def test_counts_and_point_values_from_constructed_pairs():
    off, mode = _pairs(both=50, fixed=12, broken=5, neither=33)
    result = stats.paired_comparison(off, mode, "acc1")
    assert (result["fixed"], result["broken"], result["n"]) == (12, 5, 100)
    assert result["off"] == pytest.approx(0.55) and result["value"] == pytest.approx(0.62)
    assert result["delta"] == pytest.approx(0.07)
    assert result["mcnemar_p"] == pytest.approx(scipy_stats.binomtest(5, 17, 0.5).pvalue)
    assert result["metric"] == "acc1" and result["n_resamples"] == 10_000 and result["seed"] == 0


@pytest.mark.parametrize("cells", [(50, 12, 5, 33), (400, 30, 45, 525), (5, 3, 0, 2)])
def test_bootstrap_interval_matches_scipy_paired_percentile(cells):
    off, mode = _pairs(*cells)
    ours = stats.paired_comparison(off, mode, "acc1", n_resamples=20_000, seed=1)
    reference = scipy_stats.bootstrap((mode.astype(float), off.astype(float)),
                                      lambda m, o, axis: np.mean(m, axis=axis) - np.mean(o, axis=axis),
                                      paired=True, vectorized=True, n_resamples=20_000, method="percentile",
                                      confidence_level=0.95, random_state=np.random.default_rng(7))
    # independent Monte Carlo streams: equal up to resampling noise (one resampled item is 1/n)
    n = off.size
    tolerance = max(1.5 / n, 0.004)
    assert ours["ci_low"] == pytest.approx(reference.confidence_interval.low, abs=tolerance)
    assert ours["ci_high"] == pytest.approx(reference.confidence_interval.high, abs=tolerance)
    assert ours["ci_low"] <= ours["delta"] <= ours["ci_high"]


def test_bootstrap_matches_a_naive_index_resampling_loop():
    off, mode = _pairs(both=200, fixed=25, broken=15, neither=160)
    rng = np.random.default_rng(3)
    deltas = [np.mean(mode[idx].astype(float) - off[idx]) for idx in
              (rng.integers(0, off.size, off.size) for _ in range(20_000))]
    low, high = np.quantile(deltas, [0.025, 0.975])
    ours = stats.paired_comparison(off, mode, "acc1", n_resamples=20_000)
    assert ours["ci_low"] == pytest.approx(low, abs=0.004) and ours["ci_high"] == pytest.approx(high, abs=0.004)


def test_no_discordant_pairs_give_a_zero_width_interval_and_p_one():
    off, mode = _pairs(both=30, fixed=0, broken=0, neither=10)
    result = stats.paired_comparison(off, mode, "acc1")
    assert (result["delta"], result["ci_low"], result["ci_high"], result["mcnemar_p"]) == (0.0, 0.0, 0.0, 1.0)


def test_seeded_and_reproducible_and_seed_matters():
    off, mode = _pairs(both=50, fixed=12, broken=5, neither=33)
    a = stats.paired_comparison(off, mode, "acc1", seed=4)
    assert a == stats.paired_comparison(list(off), list(mode), "acc1", seed=4)
    off, mode = _pairs(both=400, fixed=30, broken=45, neither=525)  # finer grid: 1/1000
    a, b = (stats.paired_comparison(off, mode, "acc1", n_resamples=500, seed=s) for s in (4, 5))
    assert (a["ci_low"], a["ci_high"]) != (b["ci_low"], b["ci_high"])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same items"):
        stats.paired_comparison([1, 0], [1, 0, 1], "acc1")
    with pytest.raises(ValueError, match="0/1"):
        stats.paired_comparison([1, 2], [1, 0], "acc1")
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_comparison([1, 0], [1, 1], "acc1", confidence=1.5)
    with pytest.raises(ValueError, match="at least one item"):
        stats.paired_comparison([], [], "acc1")


@pytest.mark.parametrize("successes,n", [(31, 100), (392, 1440), (0, 20), (20, 20)])
def test_proportion_interval_matches_scipy_percentile_bootstrap(successes, n):
    outcomes = np.array([1.0] * successes + [0.0] * (n - successes))
    reference = scipy_stats.bootstrap((outcomes,), np.mean, vectorized=True, n_resamples=20_000, method="percentile",
                                      random_state=np.random.default_rng(2))
    low, high = stats.bootstrap_proportion_interval(successes, n, n_resamples=20_000)
    assert low == pytest.approx(reference.confidence_interval.low, abs=max(1.5 / n, 0.004))
    assert high == pytest.approx(reference.confidence_interval.high, abs=max(1.5 / n, 0.004))
