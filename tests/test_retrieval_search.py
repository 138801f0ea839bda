"""Search: first stage vs brute-force numpy, DoLa rerank vs a naive per-candidate loop, image -> captions."""
import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from siglip_dola.retrieval import RerankConfig, open_index, search_captions, search_embedding
from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval.from_vectors import build_index_from_vectors
from tiny_index import reference_vectors

N_IMAGES, DIM, LAYERS = 300, 24, [2, 4, 6]
TAU = 0.05


@pytest.fixture(scope="module")
def gallery():
    """Synthetic fp16-rounded normalised vectors [n, 1+J, D] (the index is built with the fp16 layer store): layers = final + growing noise; two exact duplicates."""
    rng = np.random.default_rng(0)
    final = rng.standard_normal((N_IMAGES, DIM))
    rows = [final] + [final + rng.standard_normal((N_IMAGES, DIM)) * s for s in (1.5, 1.0, 0.5)]
    vectors = np.stack(rows, axis=1)  # (n, 1+J, D)
    vectors[7] = vectors[3]
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors.astype(np.float16).astype(np.float64)  # what the index stores


@pytest.fixture(scope="module")
def index(gallery, tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_index")
    paths = [f"img_{i:03d}.png" for i in range(N_IMAGES)]
    chunks = [(paths[i:i + 128], gallery[i:i + 128]) for i in range(0, N_IMAGES, 128)]
    build_index_from_vectors(root, chunks, model_id="synthetic", layers=LAYERS, num_layers=8,
                             logit_scale=-math.log(TAU), store_options=StoreOptions(layer_store="fp16"))
    return open_index(root)


def queries(n=4):
    rng = np.random.default_rng(1)
    return [q / np.linalg.norm(q) for q in rng.standard_normal((n, DIM))]


# ---------------------------------------------------------------- naive reference
def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def naive_search(gallery, text, top_k, rerank_k, mode="dynamic", alpha=0.1, static_layer=None, layers=LAYERS):
    """[(id, p_hat, q_N, first-stage rank)], premature layer, {j: JSD}; one candidate at a time, plain loops."""
    cosine = [float(np.dot(gallery[i, 0], text)) for i in range(len(gallery))]
    candidates = sorted(range(len(gallery)), key=lambda i: -cosine[i])[:rerank_k]
    q_final = softmax([cosine[i] / TAU for i in candidates])
    premature, p_hat, divergence = None, q_final, None
    if mode != "off":
        q = {j: softmax([float(np.dot(gallery[i, 1 + LAYERS.index(j)], text)) / TAU for i in candidates])
             for j in layers}
        divergence = {j: jensenshannon(q_final, q[j]) ** 2 for j in layers}  # scipy: sqrt(JSD), natural log
        premature = static_layer if mode == "static" else max(layers, key=lambda j: (divergence[j], -layers.index(j)))
        keep = [qn >= alpha * max(q_final) for qn in q_final]
        contrast = [math.log(q_final[c]) - math.log(q[premature][c]) for c in range(len(candidates)) if keep[c]]
        kept_probs = iter(softmax(contrast))
        p_hat = [next(kept_probs) if keep[c] else 0.0 for c in range(len(candidates))]
    order = sorted(range(len(candidates)), key=lambda c: (-p_hat[c], -q_final[c], c))[:top_k]
    return [(candidates[c], p_hat[c], q_final[c], c + 1) for c in order], premature, divergence


def assert_same(result, expected, premature):
    hits, _, divergence = expected
    assert [h.item for h in result.results] == [f"img_{i:03d}.png" for i, *_ in hits]
    assert [h.rank_baseline for h in result.results] == [rank for *_, rank in hits]
    np.testing.assert_allclose([h.score for h in result.results], [p for _, p, _, _ in hits], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose([h.baseline_score for h in result.results], [q for _, _, q, _ in hits],
                               rtol=1e-4, atol=1e-7)
    assert result.premature_layer == premature
    if divergence is None:  # mode off
        assert result.jsd is None and result.to_json()["jsd"] == {}
    else:  # the layers read: the candidates (dynamic) or the static one
        read = list(result.settings.layers)
        assert sorted(result.jsd) == sorted(read)
        np.testing.assert_allclose([result.jsd[j] for j in read], [divergence[j] for j in read], rtol=1e-4, atol=1e-8)
        assert result.to_json()["jsd"] == {str(j): result.jsd[j] for j in result.jsd}


# ---------------------------------------------------------------- tests
def test_first_stage_is_the_exact_top_k(index, gallery):
    for text in queries():
        result = search_embedding(index, text, RerankConfig(top_k=25, rerank_k=25, mode="off"))
        cosine = gallery[:, 0] @ text
        assert [h.item for h in result.results] == [f"img_{i:03d}.png" for i in np.argsort(-cosine)[:25]]
        assert [h.rank_baseline for h in result.results] == list(range(1, 26))
        expected = naive_search(gallery, text, 25, 25, mode="off")
        assert_same(result, expected, None)


@pytest.mark.parametrize("mode, alpha, static_layer", [("dynamic", 0.1, None), ("dynamic", 0.5, None),
                                                       ("static", 0.1, 2), ("static", 0.3, 6), ("off", 0.1, None)])
def test_rerank_matches_the_naive_formulas(index, gallery, mode, alpha, static_layer):
    for text in queries():
        config = RerankConfig(top_k=10, rerank_k=40, mode=mode, alpha=alpha, static_layer=static_layer)
        expected = naive_search(gallery, text, 10, 40, mode, alpha, static_layer)
        assert_same(search_embedding(index, text, config), expected, expected[1])


def test_masked_candidates_score_zero_and_keep_first_stage_order(index, gallery):
    text = queries()[0]
    result = search_embedding(index, text, RerankConfig(top_k=30, rerank_k=30, alpha=0.9))
    masked = [h for h in result.results if h.score == 0.0]
    assert masked, "alpha=0.9 must mask some candidates"
    assert [h.rank_baseline for h in masked] == sorted(h.rank_baseline for h in masked)
    assert_same(result, naive_search(gallery, text, 30, 30, alpha=0.9), result.premature_layer)


def test_duplicate_images_tie_and_keep_first_stage_order(index, gallery):
    text = gallery[3, 0] / np.linalg.norm(gallery[3, 0])  # images 3 and 7 are identical and best
    result = search_embedding(index, text, RerankConfig(top_k=5, rerank_k=50))
    top_two = result.results[:2]
    assert {h.item for h in top_two} == {"img_003.png", "img_007.png"}
    assert top_two[0].score == top_two[1].score and [h.rank_baseline for h in top_two] == [1, 2]


def test_layer_subset_and_small_gallery_limits(index, gallery):
    text = queries()[1]
    result = search_embedding(index, text, RerankConfig(top_k=10, rerank_k=40, layers=[4]))
    assert_same(result, naive_search(gallery, text, 10, 40, layers=[4]), 4)
    everything = search_embedding(index, text, RerankConfig(top_k=1000, rerank_k=5000))
    assert len(everything.results) == N_IMAGES
    assert_same(everything, naive_search(gallery, text, 1000, 5000), everything.premature_layer)


@pytest.mark.parametrize("config, message", [
    (RerankConfig(top_k=10, rerank_k=5), "rerank_k"),
    (RerankConfig(top_k=0), "top_k"),
    (RerankConfig(mode="greedy"), "mode must be one of"),
    (RerankConfig(mode="static", static_layer=3), r"stores layers \[2, 4, 6\], but the settings need layers \[3\]"),
    (RerankConfig(mode="dynamic", static_layer=2), "only used with mode='static'"),
    (RerankConfig(layers=[3]), r"stores layers \[2, 4, 6\], but the settings need layers \[3\]"),
])
def test_bad_configs_name_the_argument(index, config, message):
    with pytest.raises(ValueError, match=message):
        search_embedding(index, queries()[0], config)


def test_wrong_query_dimension(index):
    with pytest.raises(ValueError, match="D=24"):
        search_embedding(index, np.ones(7))


def test_image_to_captions_matches_naive(model, images):
    captions = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]
    image = images / "img_03.png"
    result = search_captions(model, image, captions, RerankConfig(top_k=5, rerank_k=8, mode="dynamic"), bucket=2)
    z = reference_vectors(model, [image], [4])[0]  # (1+J, D) from the HF model's own modules
    t = model.encode_text(captions).double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    cosine = t @ z[0]
    candidates = sorted(range(len(captions)), key=lambda c: -cosine[c])[:8]
    q_final = softmax([cosine[c] / model.tau for c in candidates])
    q_layer = softmax([float(t[c] @ z[1]) / model.tau for c in candidates])
    keep = [q >= 0.1 * max(q_final) for q in q_final]
    kept = iter(softmax([math.log(q_final[i] / q_layer[i]) for i in range(8) if keep[i]]))
    p_hat = [next(kept) if keep[i] else 0.0 for i in range(8)]
    order = sorted(range(8), key=lambda i: (-p_hat[i], -q_final[i], i))[:5]
    assert [h.item for h in result.results] == [captions[candidates[i]] for i in order]
    np.testing.assert_allclose([h.score for h in result.results], [p_hat[i] for i in order], rtol=1e-3, atol=1e-6)
    assert result.premature_layer == 4 and result.to_json()["hits"][0].keys() == {
        "rank", "item", "score", "baseline_score", "rank_baseline"}
    assert result.to_json()["item_type"] == "caption"
