"""Paired statistics of a mode against `off` on the same items: bootstrap interval, exact McNemar, fixed / broken.

Both inputs are per-item 0/1 outcomes (top-1 correct for classification, hit@k per query for retrieval),
so a paired bootstrap resample of the items is fully described by how many of each kind it draws:
fixed (off wrong, mode right: d = +1), broken (off right, mode wrong: d = -1) and unchanged (d = 0).
Drawing those counts from a multinomial is the same distribution as resampling item indices with
replacement, and costs O(n_resamples) instead of O(n_resamples * n).
"""
from __future__ import annotations

import math

import numpy as np

N_RESAMPLES = 10_000
MIN_RESAMPLES = 100  # a 95% percentile interval needs resamples in both 2.5% tails; 1 resample gave [x, x]
CONFIDENCE = 0.95
SEED = 0


def _as_outcomes(x, name: str) -> np.ndarray:
    """x (sequence / numpy / torch, [n]) as a bool numpy array; ValueError on non-0/1 values."""
    array = np.asarray(x.cpu() if hasattr(x, "cpu") else x)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D per-item outcomes, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 (or bool) outcomes per item")
    return array.astype(bool)


def discordant_counts(off, mode) -> tuple[int, int]:
    """(fixed, broken): items off got wrong and mode right, and the reverse; off, mode [n] 0/1."""
    off, mode = _as_outcomes(off, "off"), _as_outcomes(mode, "mode")
    if off.shape != mode.shape:
        raise ValueError(f"off and mode must score the same items, got {off.shape[0]} and {mode.shape[0]}")
    return int((~off & mode).sum()), int((off & ~mode).sum())


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(Binomial(fixed + broken, 1/2) <= min), capped at 1 (1 if none)."""
    if fixed < 0 or broken < 0:
        raise ValueError(f"counts must be >= 0, got fixed={fixed}, broken={broken}")
    n, k = fixed + broken, min(fixed, broken)
    if n == 0 or 2 * k == n:
        return 1.0
    # log pmf via lgamma; the tail sum in log space stays accurate for n in the millions
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0)
               for i in range(k + 1)]
    peak = max(log_pmf)
    log_tail = peak + math.log(sum(math.exp(v - peak) for v in log_pmf))
    return min(1.0, 2.0 * math.exp(log_tail))


def bootstrap_delta_interval(fixed: int, broken: int, n: int, n_resamples: int = N_RESAMPLES,
                             confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of mean(mode - off) over `n_resamples` paired bootstrap resamples of n items."""
    if n < 1:
        raise ValueError(f"need at least one item, got n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1.0 - confidence) / 2.0
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < MIN_RESAMPLES \
            or n_resamples * tail < 1:
        least = max(MIN_RESAMPLES, math.ceil(1 / tail))
        raise ValueError(f"n_resamples must be an int >= {least} for a {confidence:.0%} interval (with fewer, "
                         f"its ends are single resamples, or one), got {n_resamples!r}")
    unchanged = n - fixed - broken
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.array([fixed, broken, unchanged], dtype=np.float64) / n,
                             size=n_resamples)  # (R, 3)
    deltas = (counts[:, 0] - counts[:, 1]) / n  # (R,)
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_proportion_interval(successes: int, n: int, n_resamples: int = N_RESAMPLES,
                                  confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of one proportion (e.g. acc1 = successes / n) over resampled items."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    # a resample's success count is Binomial(n, successes / n): the fixed/broken draw with nothing broken
    return bootstrap_delta_interval(successes, 0, n, n_resamples, confidence, seed)


def paired_comparison(off, mode, metric: str, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = SEED) -> dict:
    """`mode` vs `off` on the same n items (off, mode [n] 0/1 outcomes): the result JSON's `paired` entry.

    {"metric", "off", "value", "delta", "ci_low", "ci_high", "confidence", "mcnemar_p", "fixed", "broken",
    "n", "n_resamples", "seed"}; seeded, so the same inputs give the same interval.
    """
    fixed, broken = discordant_counts(off, mode)
    off_array, mode_array = _as_outcomes(off, "off"), _as_outcomes(mode, "mode")
    n = off_array.shape[0]
    low, high = bootstrap_delta_interval(fixed, broken, n, n_resamples, confidence, seed)
    off_value, value = float(off_array.mean()), float(mode_array.mean())
    return {"metric": metric, "off": off_value, "value": value, "delta": (fixed - broken) / n,
            "ci_low": low, "ci_high": high, "confidence": confidence, "mcnemar_p": mcnemar_exact_p(fixed, broken),
            "fixed": fixed, "broken": broken, "n": n, "n_resamples": n_resamples, "seed": seed}


def format_delta(paired: dict) -> str:
    """'+0.0104 [-0.0035, +0.0243] p=0.16' for one `paired` entry."""
    return (f"{paired['delta']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}] "
            f"p={paired['mcnemar_p']:.2g}")
