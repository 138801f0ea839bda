"""Chunked per-layer log-probs (layer_logits.py) give what the old all-layers-at-once cache gave: compared with
that algorithm recomputed here (every layer's log-probs in one tensor, then each grid point / metric).
Metrics, probabilities and chosen layers are exactly equal; the JSD values up to float rounding."""
import pytest
import torch

from siglip_dola import scoring
from siglip_dola.evaluation.calibrate import CalibrationGrid, grid_points, score_grid
from siglip_dola.evaluation.evaluate import layer_lens
from siglip_dola.evaluation.layer_logits import LayerLogits, score_modes
from siglip_dola.settings import DoLaSettings
from siglip_dola.evaluation.metrics import classification_metrics, hits_at_k, one_hot_targets, rank_scores

N, n, D, C, TAU = 8, 50, 16, 20, 0.07


def old_point(final, layers, point):
    """The old score_point over the full cache layers [N-1, n, C]."""
    if point["mode"] == "off":
        return scoring.dola(final, None, None, mode="off")
    return scoring.dola(final, layers[[j - 1 for j in point["layers"]]], point["layers"], mode=point["mode"],
                   alpha=point["alpha"], static_layer=point["static_layer"], contrast_weight=point["contrast_weight"])


def sparse_signs(*shape, generator, nonzero=4):
    """Vectors [..., D] with `nonzero` entries of +-1 and zeros elsewhere: their norm is exactly 2, so every
    cosine is a multiple of 1/4 and comes out bit-identical whatever rows a BLAS kernel groups (a chunk of 3 rows
    and the full matrix take different kernels, whose float sums of random data differ in the last bit)."""
    order = torch.rand(*shape, D, generator=generator).argsort(dim=-1)
    signs = torch.where(torch.rand(*shape, D, generator=generator) < 0.5, -1.0, 1.0)
    return torch.where(order < nonzero, signs, torch.zeros(()))


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    z_final, z_layers = sparse_signs(n, generator=gen), sparse_signs(N - 1, n, generator=gen)
    bank = sparse_signs(C, generator=gen)
    labels = torch.randint(0, C, (n,), generator=gen)
    final = scoring.build_log_probs_from_rep(z_final, bank, TAU)
    old_layers = scoring.build_log_probs_from_rep(z_layers, bank, TAU)  # (N-1, n, C): the old cache
    return z_final, z_layers, bank, labels, final, old_layers


@pytest.mark.parametrize("chunk_rows", [None, 3, 17])
def test_grid_scores_and_single_layers_equal_the_old_cache(data, chunk_rows):
    z_final, z_layers, bank, labels, final, old_layers = data
    cache = LayerLogits(final, labels, None, TAU, row_layers=z_layers, columns=bank, chunk_rows=chunk_rows)
    points = grid_points(CalibrationGrid(n_buckets=(2, 3), alphas=(0.1, 0.5), contrast_weights=(1.0, 0.25)), N)
    scores, singles = score_grid(cache, points)
    for point, scored in zip(points, scores):
        expected = classification_metrics(rank_scores(old_point(final, old_layers, point.to_json())), labels)
        assert {k: scored[k] for k in expected} == expected, point  # exactly equal
    for j, scored in enumerate(singles, start=1):
        assert scored["acc1"] == classification_metrics(old_layers[j - 1], labels)["acc1"]


@pytest.mark.parametrize("chunk_rows", [3, 17])
def test_mode_results_and_layer_lens_equal_the_old_cache(data, chunk_rows):
    z_final, z_layers, bank, labels, final, old_layers = data
    cache = LayerLogits(final, labels, None, TAU, row_layers=z_layers, columns=bank, chunk_rows=chunk_rows)
    points = {"off": grid_points(CalibrationGrid(), N)[0],
              "dynamic": DoLaSettings(mode="dynamic", layers=[2, 4, 6], static_layer=None, alpha=0.1,
                                      contrast_weight=0.5, bucket=None, n_buckets=None),
              "static": DoLaSettings(mode="static", layers=[4], static_layer=4, alpha=0.2, contrast_weight=1.0,
                                     bucket=None, n_buckets=None)}
    results = score_modes(cache, points)
    for mode, point in points.items():
        old = old_point(final, old_layers, point.to_json())
        for field in ("probs", "log_probs", "final_probs", "premature_layer"):
            assert torch.equal(getattr(results[mode], field), getattr(old, field)), (mode, field)
        # the JSD's sum over classes may round differently with another tensor shape (vectorised reduction)
        torch.testing.assert_close(results[mode].jsd, old.jsd, rtol=1e-6, atol=1e-7)
    targets = one_hot_targets(labels, C)
    lens = layer_lens(cache, targets, results["dynamic"], "acc1")
    assert lens["top1"][:-1] == [float(hits_at_k(old_layers[j], targets, 1).float().mean()) for j in range(N - 1)]
    old_jsd = scoring.dola(final, old_layers, list(range(1, N)), mode="off").jsd.mean(dim=-1).tolist()
    assert lens["mean_jsd"] == pytest.approx(old_jsd, rel=1e-6)


def test_text_to_image_layout_equals_per_layer_stack(data):
    z_final, z_layers, bank, labels, final, old_layers = data  # bank rows play the texts, z the gallery
    t2i_final = scoring.build_log_probs_from_rep(bank, z_final, TAU)  # (C texts, n images)
    old = torch.stack([scoring.build_log_probs_from_rep(bank, z_j, TAU) for z_j in z_layers])  # (N-1, C, n)
    cache = LayerLogits(t2i_final, None, None, TAU, rows=bank, column_layers=z_layers, chunk_rows=6)
    chunks = [stack for _, _, stack in cache.iter_chunks()]
    assert torch.equal(torch.cat(chunks, dim=1), old)


def test_chunks_bound_the_layer_stack():
    final = torch.zeros(1000, 30)
    cache = LayerLogits(final, None, None, TAU, row_layers=torch.zeros(23, 1000, 4), columns=torch.zeros(30, 4))
    import siglip_dola.evaluation.layer_logits as module
    old_floor, module.CHUNK_FLOOR = module.CHUNK_FLOOR, 1
    try:
        chunks = cache.chunks()
    finally:
        module.CHUNK_FLOOR = old_floor
    sizes = [c.stop - c.start for c in chunks]
    assert sum(sizes) == 1000 and chunks[0].start == 0 and all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert max(sizes) * 23 * 30 <= 1000 * 30  # a chunk's (N-1) x r x C stack is at most n x C
