"""DoLaSigLIP vs a naive reference built from the timm ViT's own modules, scipy's JSD and plain loops."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import jensenshannon
from timm.models.vision_transformer import VisionTransformer

from siglip_dola.loading import from_model
from siglip_dola.scorer import DoLaSigLIP, rerank_with_dola_siglip

DEPTH, WIDTH, IMAGE = 24, 16, 16
LOGIT_SCALE = math.log(30.0)
TAU = 1 / 30.0


class Bank:
    """A precomputed text bank: labels + [C, D] embeddings (what TextBank holds)."""
    def __init__(self, labels, embeds):
        self.labels, self.embeds, self.model_id = labels, embeds, ""  # precomputed: provenance unknown


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMAGE, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=2,
                              mlp_ratio=2.0, class_token=False, global_pool="map", num_classes=0)
    return model.eval()


@pytest.fixture(scope="module")
def loaded(vit):
    return from_model(vit, logit_scale=LOGIT_SCALE)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(5, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bank():
    embeds = torch.randn(7, WIDTH, generator=torch.Generator().manual_seed(2))
    return Bank([f"class{c}" for c in range(7)], embeds)


# ---------------------------------------------------------------- naive reference
def naive_layer_embeds(vit, pixels) -> list[np.ndarray]:
    """[z_1, ..., z_N]: every block's output through the model's own final norm + MAP head."""
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
        outputs = []
        for block in vit.blocks:
            x = block(x)
            outputs.append(vit.forward_head(vit.norm(x)).double().numpy())
        own = vit(pixels).double().numpy()  # the model's own forward
    np.testing.assert_allclose(outputs[-1], own, rtol=1e-5, atol=1e-6)
    return outputs


def naive_probs(z, bank, tau):
    z = z / np.linalg.norm(z)
    t = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    logits = t @ z / tau
    e = np.exp(logits - logits.max())
    return e / e.sum()


def naive_dola(z_by_layer, bank, tau, layers, mode, alpha, static_layer=None):
    """One image: (p_hat, q_N, premature layer or None, {layer: JSD}) with plain loops."""
    bank = bank.double().numpy()
    q_final = naive_probs(z_by_layer[-1], bank, tau)
    q = {j: naive_probs(z_by_layer[j - 1], bank, tau) for j in layers}
    jsd = {j: jensenshannon(q_final, q[j]) ** 2 for j in layers}  # scipy: sqrt of JSD, natural log
    if mode == "off":
        return q_final, q_final, None, jsd
    best = static_layer if mode == "static" else max(layers, key=lambda j: jsd[j])  # first max wins
    keep = [c for c in range(len(q_final)) if q_final[c] >= alpha * q_final.max()]
    contrast = {c: math.log(q_final[c]) - math.log(q[best][c]) for c in keep}
    top = max(contrast.values())
    total = sum(math.exp(v - top) for v in contrast.values())
    p_hat = np.array([math.exp(contrast[c] - top) / total if c in contrast else 0.0 for c in range(len(q_final))])
    return p_hat, q_final, best, jsd


def check_against_naive(results, vit, pixels, bank, tau, layers, mode, alpha=0.1, static_layer=None):
    per_layer = naive_layer_embeds(vit, pixels)
    for b, result in enumerate(results):
        p_hat, q_final, best, jsd = naive_dola([z[b] for z in per_layer], bank.embeds, tau, layers, mode,
                                               alpha, static_layer)
        got = {row["label"]: row for row in result["predictions"]}
        assert len(got) == len(bank.labels)
        for c, label in enumerate(bank.labels):
            assert got[label]["score"] == pytest.approx(p_hat[c], abs=2e-5)
            assert got[label]["baseline_score"] == pytest.approx(q_final[c], abs=2e-5)
        assert result["premature_layer"] == best
        assert list(result["jsd"]) == list(layers)
        for j in layers:
            assert result["jsd"][j] == pytest.approx(jsd[j], abs=2e-5)
        scores = [(row["score"], row["baseline_score"]) for row in result["predictions"]]
        assert scores == sorted(scores, reverse=True)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("mode,static_layer", [("dynamic", None), ("static", 20), ("static", 7), ("off", None)])
def test_classify_matches_naive_reference(vit, loaded, pixels, bank, mode, static_layer):
    scorer = DoLaSigLIP(loaded, mode=mode, static_layer=static_layer, batch_size=2)
    results = scorer.classify(pixels, bank, top_k=len(bank.labels))
    assert [r["image"] for r in results] == list(range(len(pixels)))
    layers = scorer.settings.layers if mode != "off" else []
    check_against_naive(results, vit, pixels, bank, TAU, layers, mode, static_layer=static_layer or None)


def test_explicit_layers_alpha_and_tau_override(vit, loaded, pixels, bank):
    scorer = DoLaSigLIP(loaded, layers=[3, 9, 15], alpha=0.02, tau=0.2)
    results = scorer.classify(pixels, bank, top_k=len(bank.labels))
    check_against_naive(results, vit, pixels, bank, 0.2, [3, 9, 15], "dynamic", alpha=0.02)


def test_mode_off_is_plain_zero_shot_argmax(vit, loaded, pixels, bank):
    with torch.no_grad():
        own_logits = torch.nn.functional.normalize(vit(pixels), dim=-1) @ \
            torch.nn.functional.normalize(bank.embeds, dim=-1).T
    results = DoLaSigLIP(loaded, mode="off").classify(pixels, bank, top_k=1)
    assert [r["predictions"][0]["label"] for r in results] == [bank.labels[i] for i in own_logits.argmax(-1)]
    assert all(r["premature_layer"] is None and r["jsd"] == {} for r in results)


def test_one_backbone_forward_per_batch(vit, loaded, pixels, bank):
    calls = []
    handle = vit.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    try:
        DoLaSigLIP(loaded, batch_size=8).classify(pixels, bank)
        assert len(calls) == 1
        DoLaSigLIP(loaded, batch_size=2).classify(pixels, bank)
        assert len(calls) == 1 + 3
    finally:
        handle.remove()


def test_model_unchanged_after_scoring(vit, loaded, pixels, bank):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    flags = [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in vit.modules()]
    grads = [p.requires_grad for p in vit.parameters()]
    for mode in ("dynamic", "static", "off"):
        DoLaSigLIP(loaded, mode=mode).classify(pixels, bank)
    DoLaSigLIP(loaded).rerank_images(bank.embeds[0], pixels)
    with pytest.raises(ValueError):
        DoLaSigLIP(loaded).classify(pixels, Bank(["a"], torch.ones(1, WIDTH + 1)))
    after = vit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in vit.modules()]
    assert grads == [p.requires_grad for p in vit.parameters()]


def test_rerank_orders_all_texts(vit, loaded, pixels, bank):
    results = DoLaSigLIP(loaded).rerank(pixels[:2], bank)
    classified = DoLaSigLIP(loaded).classify(pixels[:2], bank, top_k=len(bank.labels))
    for ranked, classes in zip(results, classified):
        assert [r["text"] for r in ranked["predictions"]] == [c["label"] for c in classes["predictions"]]


def test_rerank_images_swaps_roles(vit, loaded, pixels, bank):
    """Text -> images: the candidates are the images and the per-layer image embeddings are the bank."""
    query = bank.embeds[3]
    scorer = DoLaSigLIP(loaded, layers=[6, 12, 18])
    (result,) = scorer.rerank_images(query, pixels)
    per_layer = naive_layer_embeds(vit, pixels)
    images_as_bank = [torch.from_numpy(z) for z in per_layer]  # z_j [n, D] per layer j
    q_final = naive_probs(query.double().numpy(), images_as_bank[-1].numpy(), TAU)
    q = {j: naive_probs(query.double().numpy(), images_as_bank[j - 1].numpy(), TAU) for j in [6, 12, 18]}
    jsd = {j: jensenshannon(q_final, q[j]) ** 2 for j in q}
    best = max(q, key=lambda j: jsd[j])
    assert result["premature_layer"] == best
    keep = q_final >= 0.1 * q_final.max()
    contrast = np.where(keep, np.log(q_final) - np.log(q[best]), -np.inf)
    p_hat = np.exp(contrast - contrast.max()) / np.exp(contrast - contrast.max()).sum()
    got = {row["image"]: row for row in result["ranking"]}
    for i in range(len(pixels)):
        assert got[i]["score"] == pytest.approx(p_hat[i], abs=2e-5)
        assert got[i]["baseline_score"] == pytest.approx(q_final[i], abs=2e-5)


def test_rerank_images_from_precomputed_embeddings(loaded, pixels, bank):
    scorer = DoLaSigLIP(loaded, layers=[6, 12, 18])
    ids, z_final, z_layers = scorer.embed_images(pixels)
    direct = scorer.rerank_images(bank.embeds[:2], pixels)
    # an index storing more layers, in another order: the scorer picks its own
    stored_layers = [18, 2, 12, 6]
    stored = torch.stack([z_layers[2], torch.zeros_like(z_final), z_layers[1], z_layers[0]])
    names = [f"img{i}" for i in ids]
    indexed = scorer.rerank_images(bank.embeds[:2], image_embeds=(z_final, stored), embed_layers=stored_layers,
                                   ids=names, top_k=3)
    for d, x in zip(direct, indexed):
        assert [f"img{r['image']}" for r in d["ranking"][:3]] == [r["image"] for r in x["ranking"]]
        assert [r["score"] for r in d["ranking"][:3]] == pytest.approx([r["score"] for r in x["ranking"]], abs=1e-6)
    with pytest.raises(ValueError, match="lack layers"):
        scorer.rerank_images(bank.embeds[0], image_embeds=(z_final, stored[:2]), embed_layers=[18, 2])


def test_ties_identical_bank_rows(loaded, pixels):
    """All rows equal: every q is uniform, every JSD is 0, the earliest candidate layer wins, scores uniform."""
    tied = Bank(["a", "b", "c"], torch.ones(3, WIDTH))
    results = DoLaSigLIP(loaded, layers=[20, 18, 22]).classify(pixels[:2], tied, top_k=3)
    for result in results:
        assert result["premature_layer"] == 20
        assert [row["score"] for row in result["predictions"]] == pytest.approx([1 / 3] * 3)
        assert [row["label"] for row in result["predictions"]] == ["a", "b", "c"]  # stable order


def test_pil_and_path_inputs_with_a_corrupt_file(loaded, bank, tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "1b_corrupt.png").write_bytes(b"not a png")
    scorer = DoLaSigLIP(loaded, batch_size=2)
    from_pil = scorer.classify(images, bank)
    with pytest.warns(UserWarning, match="1b_corrupt.png"):
        from_paths = scorer.classify(str(tmp_path), bank)
    assert [r["image"] for r in from_paths] == [str(tmp_path / f"{i}.png") for i in range(3)]
    for a, b in zip(from_pil, from_paths):
        assert a["predictions"] == b["predictions"]


def test_from_calibration(loaded, tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"model": loaded.model_id, "choice": {"mode": "static", "bucket": 2,
                                                                     "static_layer": 12, "alpha": 0.05}}))
    scorer = DoLaSigLIP.from_calibration(path, loaded)
    assert (scorer.settings.mode, scorer.settings.layers, scorer.settings.static_layer, scorer.settings.alpha) == ("static", [12], 12, 0.05)
    path.write_text(json.dumps({"model": "other-model", "choice": {"mode": "dynamic"}}))
    with pytest.raises(ValueError, match="other-model"):
        DoLaSigLIP.from_calibration(path, loaded)
    path.write_text(json.dumps({"model": loaded.model_id}))
    with pytest.raises(ValueError, match="choice"):
        DoLaSigLIP.from_calibration(path, loaded)


def test_rerank_with_dola_siglip_entry_point(loaded, pixels, bank):
    result = rerank_with_dola_siglip(pixels, bank, candidate_layers=(18, 20, 22), model=loaded)
    expected = DoLaSigLIP(loaded).classify(pixels, bank, top_k=len(bank.labels))
    for b, row in enumerate(expected):
        assert int(result.premature_layer[b]) == row["premature_layer"]
        for prediction in row["predictions"]:
            assert float(result.probs[b, bank.labels.index(prediction["label"])]) == prediction["score"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="greedy"), "mode"), (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"),
    (dict(static_layer=5), "static_layer"), (dict(layers=[24]), "layers"), (dict(bucket=4), "bucket"),
    (dict(tau=-1.0), "tau"), (dict(batch_size=0), "batch_size"),
    (dict(cuda_graphs=True), "cuda_graphs=True needs the model on a CUDA device"),
])
def test_bad_configuration(loaded, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoLaSigLIP(loaded, **kwargs)


@pytest.mark.parametrize("flag", ["cuda_graphs"])
def test_switches_must_be_bools(loaded, flag):
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        DoLaSigLIP(loaded, **{flag: 1})


def test_bad_inputs(loaded, pixels, bank):
    scorer = DoLaSigLIP(loaded)
    with pytest.raises(ValueError, match=f"D={WIDTH}"):
        scorer.classify(pixels, Bank(["a", "b"], torch.ones(2, WIDTH * 2)))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.classify(pixels[0], bank)
    with pytest.raises(ValueError, match="top_k"):
        scorer.classify(pixels, bank, top_k=0)
    with pytest.raises(TypeError, match="bank"):
        scorer.classify(pixels, {"a": 1})
    with pytest.raises(ValueError, match="no text tower"):
        scorer.rerank_images("a cat", pixels)
    with pytest.raises(ValueError, match="exactly one"):
        scorer.rerank_images(bank.embeds[0])


def test_bank_of_another_model_is_refused(loaded, pixels, bank):
    import dataclasses

    from siglip_dola.text_bank.bank import TextBank

    with_text_tower = dataclasses.replace(loaded, encode_text=lambda texts: torch.ones(len(texts), WIDTH))
    other = TextBank(labels=list(bank.labels), embeds=bank.embeds, model_id="some-other-model")
    with pytest.raises(ValueError, match="some-other-model"):
        DoLaSigLIP(with_text_tower).classify(pixels, other)
    same = TextBank(labels=list(bank.labels), embeds=bank.embeds, model_id=loaded.model_id)
    assert len(DoLaSigLIP(with_text_tower).classify(pixels, same)) == pixels.shape[0]
    # without a text tower (a Janus/timm tower) every bank comes from elsewhere: accepted
    assert len(DoLaSigLIP(loaded).classify(pixels, other)) == pixels.shape[0]
