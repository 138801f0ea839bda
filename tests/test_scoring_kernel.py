"""scoring/kernel.py: the one-kernel DoLa scoring (Triton CPU interpreter, in a subprocess) against a naive float64
numpy/scipy loop, and scoring.score through it against the eager path (values and error messages)."""
import math
import textwrap

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, softmax

from interpreter import run_interpreted
from siglip_dola.scoring import kernel
from siglip_dola.scoring.logspace import rep_logits

LN2 = math.log(2.0)
LAYERS = [2, 4, 6]


# ---------------------------------------------------------------- cases and the independent reference
def make_cases() -> dict:
    """name -> (logits (J+1, R, C) float32, layer numbers, alpha, mode, static position)."""
    rng = np.random.default_rng(0)
    logits = lambda *shape, scale=3.0: (rng.normal(size=shape) * scale).astype(np.float32)  # noqa: E731
    random = logits(4, 5, 1000)
    twins = logits(4, 3, 7)
    twins[3] = twins[2]                                       # candidates 2 and 3 (layers 4, 16) tie exactly
    same = np.repeat(logits(1, 3, 9), 4, axis=0)              # every layer equals the final one
    same[1:] = np.repeat(logits(1, 3, 9), 3, axis=0)          # ... then all three candidates identical
    peaks = np.array([[1e4, -1e4, -1e4], [-1e4, 1e4, 1e4]], np.float32)
    huge = rng.uniform(-1e4, 1e4, size=(3, 4, 50)).astype(np.float32)
    bad = logits(4, 5, 13)
    bad[2, 1, 4], bad[0, 3, 0], bad[3, 4, 12] = np.nan, np.inf, -np.inf
    return {
        "random": (random, LAYERS, 0.1, "dynamic", -1),
        "random_static": (random, LAYERS, 0.1, "static", 1),
        "random_off": (random, LAYERS, 0.1, "off", -1),
        "one_class": (logits(4, 3, 1), LAYERS, 0.1, "dynamic", -1),
        "seven_classes": (logits(4, 6, 7), LAYERS, 0.3, "dynamic", -1),
        "tie_two_layers": (twins, [9, 4, 16], 0.1, "dynamic", -1),
        "tie_all_layers": (same, [12, 8, 10], 0.1, "dynamic", -1),
        "alpha_one": (logits(4, 4, 11), LAYERS, 1.0, "dynamic", -1),
        "alpha_tiny": (logits(4, 4, 11), LAYERS, 1e-30, "dynamic", -1),
        "opposite_peaks": (np.stack([peaks, -peaks, peaks]), [2, 4], 0.1, "dynamic", -1),
        "logits_1e4": (huge, [20, 22], 0.1, "dynamic", -1),
        "one_layer": (logits(2, 4, 20), [17], 0.1, "dynamic", -1),
        "one_layer_static": (logits(2, 4, 20), [17], 0.1, "static", 0),
        "no_layers_off": (logits(1, 4, 20), [], 0.1, "off", -1),
        "nan_inf_rows": (bad, LAYERS, 0.1, "dynamic", -1),
        # bf16 logits (autocast's matmul output), passed to the kernel AS bf16: values exactly representable
        "random_bf16": (torch.from_numpy(logits(4, 5, 300)).bfloat16().float().numpy(), LAYERS, 0.1, "dynamic", -1),
    }


def ref_row(row_logits, layers, alpha, mode, static_position):
    """One example, float64: (p_hat, log p_hat, q_N, premature layer, [JSD_j]) by explicit loops."""
    log_q = log_softmax(row_logits.astype(np.float64), axis=-1)  # (J+1, C)
    q = np.exp(log_q)
    jsd = [float(np.nan_to_num(jensenshannon(q[0], q[j + 1])) ** 2) for j in range(len(layers))]
    if mode == "off":
        return q[0], log_q[0], q[0], -1, jsd
    best = static_position
    if mode == "dynamic":
        best = 0
        for j in range(1, len(layers)):
            if jsd[j] > jsd[best]:  # strictly larger: a tie keeps the earlier layer
                best = j
    head = [c for c in range(q.shape[1]) if log_q[0, c] >= log_q[0].max() + math.log(alpha)]
    contrast = np.array([log_q[0, c] - log_q[best + 1, c] for c in head])
    p_hat = np.zeros(q.shape[1])
    p_hat[head] = softmax(contrast)
    with np.errstate(divide="ignore"):
        return p_hat, np.log(p_hat), q[0], layers[best], jsd


# ---------------------------------------------------------------- interpreter run (one subprocess for all)
INTERPRETER_RUN = textwrap.dedent("""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"   # set before triton is imported
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    from test_scoring_kernel import make_cases, score_cases
    from siglip_dola import config, scoring
    from siglip_dola.modes import MODES
    from siglip_dola.scoring import kernel
    assert kernel.triton is not None
    by_case = {}
    for name, (logits, layers, alpha, mode, position) in make_cases().items():
        logits = torch.from_numpy(logits)
        if name.endswith("_bf16"):
            logits = logits.bfloat16()
        assert kernel.usable(logits)
        table = torch.tensor(layers, dtype=torch.int64) if layers else None
        outputs = kernel.dola_rows(logits, table, alpha, MODES[mode], position)
        by_case[name] = [(list(x.shape), x.tolist()) for x in outputs]
    calls = []
    original = kernel.dola_rows
    kernel.dola_rows = lambda *a: calls.append(1) or original(*a)
    score_results = {}
    for name, (args, kwargs) in score_cases().items():
        results = {}
        for switch in (True, False):
            before = len(calls)
            try:
                with config.override(triton_scoring=switch):
                    result = scoring.score(*args, **kwargs)
                results[switch] = {f: (type(v).__name__, str(v.dtype), list(v.shape), np.asarray(v).tolist())
                                   for f, v in vars(result).items() if v is not None}
            except ValueError as error:
                results[switch] = {"error": str(error)}
            results[switch]["kernel_calls"] = len(calls) - before
        score_results[name] = results
    print(json.dumps({"kernel": by_case, "score": score_results}))
""")


def score_cases() -> dict:
    """name -> (score args, kwargs) for scoring.score with and without the Triton path."""
    gen = torch.Generator().manual_seed(3)
    z_final, z_layers = torch.randn(4, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)
    bank = torch.randn(30, 16, generator=gen)
    nan_z, nan_layers, inf_bank = z_final.clone(), z_layers.clone(), bank.clone()
    nan_z[2, 5], nan_layers[1, 0, 3], inf_bank[7, 1] = math.nan, math.nan, math.inf
    return {
        "dynamic": ((z_final, z_layers, bank, 0.05, LAYERS), {}),
        "static": ((z_final, z_layers, bank, 0.05, LAYERS), {"mode": "static", "static_layer": 6}),
        "off": ((z_final, z_layers, bank, 0.05, LAYERS), {"mode": "off"}),
        "off_no_layers": ((z_final, None, bank, 0.05, None), {"mode": "off"}),
        "off_empty_stack": ((z_final, z_layers[:0], bank, 0.05, None), {"mode": "off"}),
        "lead_dims_numpy": ((z_final.reshape(2, 2, 16).numpy(), z_layers.reshape(3, 2, 2, 16).numpy(), bank.numpy(),
                             0.05, LAYERS), {"alpha": 0.3}),
        "one_example_fp16": ((z_final[0].half(), z_layers[:, 0].half(), bank.half(), 0.05, LAYERS), {}),
        "nan_z_final": ((nan_z, z_layers, bank, 0.05, LAYERS), {}),
        "nan_z_layers": ((z_final, nan_layers, bank, 0.05, LAYERS), {}),
        "inf_text_bank": ((z_final, z_layers, inf_bank, 0.05, LAYERS), {}),
    }


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(INTERPRETER_RUN, timeout=300)


# ---------------------------------------------------------------- kernel against the float64 loop
def kernel_outputs(interpreted, name) -> list[np.ndarray]:
    return [np.array(values, dtype=np.float64).reshape(shape) for shape, values in interpreted["kernel"][name]]


@pytest.mark.parametrize("name", sorted(make_cases()))
def test_kernel_matches_naive_float64_loop(interpreted, name):
    logits, layers, alpha, mode, position = make_cases()[name]
    probs, log_probs, final_probs, premature, jsd, nonfinite = kernel_outputs(interpreted, name)
    rows, classes = logits.shape[1:]
    assert probs.shape == log_probs.shape == final_probs.shape == (rows, classes)
    assert premature.shape == (rows,) and jsd.shape == (len(layers), rows) and nonfinite.shape == (rows,)
    expected_bad = ~np.isfinite(logits).all(axis=(0, 2))
    np.testing.assert_array_equal(nonfinite != 0, expected_bad)
    for r in np.flatnonzero(~expected_bad):
        p_hat, log_p_hat, q_final, layer, jsd_row = ref_row(logits[:, r], layers, alpha, mode, position)
        assert premature[r] == layer, (r, jsd[:, r], jsd_row)
        np.testing.assert_allclose(probs[r], p_hat, atol=1e-5)
        np.testing.assert_allclose(final_probs[r], q_final, atol=1e-5)
        np.testing.assert_allclose(jsd[:, r], jsd_row, atol=1e-5)
        assert (probs[r][p_hat == 0] == 0).all() and np.isneginf(log_probs[r][p_hat == 0]).all()
        kept = p_hat > 1e-30
        np.testing.assert_allclose(log_probs[r][kept], log_p_hat[kept], atol=1e-3, rtol=1e-4)
    assert ((jsd[:, ~expected_bad] >= 0) & (jsd[:, ~expected_bad] <= np.float32(LN2))).all()  # ln 2 in fp32


def test_kernel_tie_and_extreme_cases_are_exact(interpreted):
    by_case = {name: [x.tolist() for x in kernel_outputs(interpreted, name)] for name in make_cases()}
    jsd = np.array(by_case["tie_two_layers"][4])  # layers [9, 4, 16]; 4 and 16 are the same logits
    assert (jsd[1] == jsd[2]).all()  # bit-equal JSDs: a real tie
    assert by_case["tie_two_layers"][3] == np.where(jsd[1] >= jsd[0], 4, 9).tolist() and (jsd[1] > jsd[0]).any()
    assert by_case["tie_all_layers"][3] == [12, 12, 12]
    assert by_case["opposite_peaks"][0] == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    np.testing.assert_allclose(by_case["opposite_peaks"][4][0], [LN2, LN2], atol=1e-6)
    assert by_case["one_class"][0] == [[1.0]] * 3 and by_case["one_class"][3] == [2, 2, 2]
    assert by_case["random_off"][3] == [-1] * 5 and by_case["no_layers_off"][4] == []


# ---------------------------------------------------------------- scoring.score through the kernel vs eager
@pytest.mark.parametrize("name", sorted(score_cases()))
def test_score_triton_path_equals_eager(interpreted, name):
    triton_path, eager = interpreted["score"][name]["true"], interpreted["score"][name]["false"]
    assert triton_path.pop("kernel_calls") == 1 and eager.pop("kernel_calls") == 0
    if "error" in eager:
        assert triton_path == eager
        assert eager["error"] == f"{name.split('_', 1)[1]} must be finite (no NaN or inf)"
        return
    assert triton_path.keys() == eager.keys() == {"probs", "log_probs", "final_probs", "premature_layer", "jsd"}
    for field, (kind, dtype, shape, values) in eager.items():
        assert triton_path[field][:3] == [kind, dtype, shape], field
        np.testing.assert_allclose(np.array(triton_path[field][3], dtype=np.float64), values, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- eager-side facts the Triton path relies on
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_z_or_bank_always_gives_non_finite_logits(bad):
    """The kernel's logits flag replaces score's per-argument checks: F.normalize spreads any NaN/inf."""
    gen = torch.Generator().manual_seed(5)
    z, bank = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen) * 1e3
    for index in range(z.numel()):
        poisoned = z.clone()
        poisoned.view(-1)[index] = bad
        logits = rep_logits(poisoned, bank, 1e-3)  # (3, 5)
        assert not torch.isfinite(logits[index // 4]).any() and torch.isfinite(logits[np.arange(3) != index // 4]).all()
    for index in range(bank.numel()):
        poisoned = bank.clone()
        poisoned.view(-1)[index] = bad
        assert not torch.isfinite(rep_logits(z, poisoned, 1e-3)[:, index // 4]).any()


def test_usable_only_for_float_contiguous_rows_within_the_class_limit(monkeypatch):
    from siglip_dola import config   # TRITON_INTERPRET is read once, at its import: stand in for either value
    monkeypatch.setattr(config, "triton_interpreted", lambda: False)
    assert not kernel.usable(torch.zeros(2, 3, 10))                  # CPU, no interpreter requested
    monkeypatch.setattr(config, "triton_interpreted", lambda: True)
    has_triton = kernel.triton is not None
    assert kernel.usable(torch.zeros(2, 3, 10)) == has_triton
    assert kernel.usable(torch.zeros(2, 3, kernel.MAX_CLASSES)) == has_triton
    assert not kernel.usable(torch.zeros(2, 3, kernel.MAX_CLASSES + 1))
    assert not kernel.usable(torch.zeros(2, 3, 10, dtype=torch.float64))
    assert kernel.usable(torch.zeros(2, 3, 10, dtype=torch.bfloat16)) == has_triton   # autocast's logits
    assert not kernel.usable(torch.zeros(2, 10, 3).transpose(1, 2))  # not contiguous
    assert not kernel.usable(torch.zeros(2, 0, 10))                  # no rows
