"""contrast weight lambda (F = log q_N - lambda * log q_M on V_head) in every scoring path, against a float64 loop:
eager dola / score / contrast_and_mask, and the Triton kernel under its CPU interpreter (subprocess)."""
import math
import textwrap

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax

from interpreter import run_interpreted
from siglip_dola import scoring

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def naive(logits, layers, alpha, mode, static_layer, weight):
    """logits (J+1, R, C) float64 loops: (p_hat [R, C], premature [R]); JSD by its definition."""
    log_q = log_softmax(np.asarray(logits, np.float64), axis=-1)
    q = np.exp(log_q)
    rows, classes = log_q.shape[1:]
    p_hat, premature = np.zeros((rows, classes)), []
    for r in range(rows):
        def jsd(j):
            m = 0.5 * (q[0, r] + q[j + 1, r])
            kl = lambda a: sum(a[c] * math.log(a[c] / m[c]) for c in range(classes) if a[c] > 0)  # noqa: E731
            return 0.5 * (kl(q[0, r]) + kl(q[j + 1, r]))
        if mode == "static":
            best = layers.index(static_layer)
        else:
            values = [jsd(j) for j in range(len(layers))]
            best = max(range(len(layers)), key=lambda j: (values[j], -j))  # ties: the earliest layer
        premature.append(layers[best])
        top = max(log_q[0, r])
        head = [c for c in range(classes) if log_q[0, r, c] >= top + math.log(alpha)]
        contrast = [log_q[0, r, c] - weight * log_q[best + 1, r, c] for c in head]
        p_hat[r, head] = softmax(contrast)
    return p_hat, premature


def cases():
    rng = np.random.default_rng(7)
    random = (rng.normal(size=(4, 6, 40)) * 3).astype(np.float32)
    return {f"{mode}_w{w}": (random, [2, 4, 6], 0.05, mode, 4 if mode == "static" else None, w)
            for mode in ("dynamic", "static") for w in WEIGHTS}


@pytest.mark.parametrize("name", sorted(cases()))
def test_eager_dola_matches_float64_loop(name):
    logits, layers, alpha, mode, static_layer, weight = cases()[name]
    expected, premature = naive(logits, layers, alpha, mode, static_layer, weight)
    result = scoring.dola(torch.from_numpy(logits[0]).double(), torch.from_numpy(logits[1:]).double(), layers, mode=mode,
                     alpha=alpha, static_layer=static_layer, contrast_weight=weight)
    np.testing.assert_allclose(result.probs.numpy(), expected, atol=1e-12)
    assert result.premature_layer.tolist() == premature


def test_weight_zero_is_q_N_renormalised_on_the_head_set():
    logits, layers, alpha = cases()["dynamic_w0.0"][:3]
    result = scoring.dola(logits[0], logits[1:], layers, alpha=alpha, contrast_weight=0.0)
    q_N = softmax(logits[0].astype(np.float64), axis=-1)
    head = q_N >= alpha * q_N.max(axis=-1, keepdims=True)
    np.testing.assert_allclose(result.probs, np.where(head, q_N, 0) / (q_N * head).sum(-1, keepdims=True), atol=1e-6)


def test_contrast_and_mask_weight_with_zero_q_M():
    q_N, q_M = np.array([0.5, 0.3, 0.2]), np.array([0.0, 0.5, 0.5])
    p0, _ = scoring.contrast_and_mask(q_N, q_M, alpha=0.1, contrast_weight=0.0)  # q_M = 0 does not matter at lambda 0
    np.testing.assert_allclose(p0, q_N, atol=1e-12)
    p_half, _ = scoring.contrast_and_mask(q_N, q_M, alpha=0.1, contrast_weight=0.5)  # F = +inf where q_M = 0 (lambda > 0)
    np.testing.assert_allclose(p_half, [1.0, 0.0, 0.0])
    q_M = np.array([0.2, 0.5, 0.3])
    p, _ = scoring.contrast_and_mask(q_N, q_M, alpha=0.1, contrast_weight=0.25)
    np.testing.assert_allclose(p, softmax(np.log(q_N) - 0.25 * np.log(q_M)), atol=1e-12)


def test_score_eager_passes_weight():
    gen = torch.Generator().manual_seed(0)
    z_final, z_layers, bank = torch.randn(3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen), torch.randn(9, 8, generator=gen)
    normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    reps = np.concatenate([z_final[None].numpy(), z_layers.numpy()]).astype(np.float64)
    logits = normalise(reps) @ normalise(bank.numpy().astype(np.float64)).T / 0.1
    expected, premature = naive(logits, [3, 5], 0.2, "dynamic", None, 0.5)
    from siglip_dola import config

    with config.override(triton_scoring=False):
        result = scoring.score(z_final, z_layers, bank, 0.1, [3, 5], alpha=0.2, contrast_weight=0.5)
    np.testing.assert_allclose(result.probs.numpy(), expected, atol=1e-5)
    assert result.premature_layer.tolist() == premature


@pytest.mark.parametrize("bad, error", [(-0.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                                        (True, TypeError), ("1", TypeError)])
def test_bad_weight_names_the_argument(bad, error):
    with pytest.raises(error, match="contrast_weight"):
        scoring.dola(np.zeros((2, 3)), np.zeros((1, 2, 3)), [2], contrast_weight=bad)


INTERPRETER_RUN = textwrap.dedent("""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_contrast_weight import cases
    from siglip_dola.modes import MODES
    from siglip_dola.scoring import kernel
    out = {}
    for name, (logits, layers, alpha, mode, static_layer, weight) in cases().items():
        logits = torch.from_numpy(logits)
        assert kernel.usable(logits)
        position = layers.index(static_layer) if mode == "static" else -1
        probs, _, _, premature, _, _ = kernel.dola_rows(logits, torch.tensor(layers), alpha, MODES[mode], position, weight)
        out[name] = [probs.tolist(), premature.tolist()]
    print(json.dumps(out))
""")


def test_triton_kernel_matches_float64_loop():
    kernel = run_interpreted(INTERPRETER_RUN, timeout=300)
    for name, (logits, layers, alpha, mode, static_layer, weight) in cases().items():
        expected, premature = naive(logits, layers, alpha, mode, static_layer, weight)
        np.testing.assert_allclose(np.array(kernel[name][0]), expected, atol=1e-5, err_msg=name)
        assert kernel[name][1] == premature, name
