"""Retrieval at scale, small: row checksums caught by a plain search, compressed layer stores vs numpy and
naive DoLa, the approximate first stage's recall vs brute force, index add to an IVF index."""
import json
import math
import warnings

import faiss
import numpy as np
import pytest

from siglip_dola.retrieval import IndexCorruptError, RerankConfig, open_index, search_embedding, verify_index
from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval.first_stage import choose_factory, parse_memory
from siglip_dola.retrieval.from_vectors import build_index_from_vectors
from siglip_dola.retrieval.layer_store import LayerStore, parse_store
from test_retrieval_search import naive_search

N, DIM, LAYERS, TAU = 3000, 24, [2, 4, 6], 0.05


def gallery(n=N, seed=0):
    """Clustered unit vectors [n, 1+J, D] float64: final = centre + noise, layer j = final + noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    final = centres[rng.integers(0, 40, n)] + 0.7 * rng.standard_normal((n, DIM))
    rows = [final] + [final + rng.standard_normal((n, DIM)) * s for s in (1.5, 1.0, 0.5)]
    vectors = np.stack(rows, axis=1)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def build(root, vectors, chunk=700, start=0, **options):
    paths = [f"img_{i:05d}.png" for i in range(start, start + len(vectors))]
    chunks = [(paths[i:i + chunk], vectors[i:i + chunk]) for i in range(0, len(vectors), chunk)]
    return build_index_from_vectors(root, chunks, model_id="synthetic", layers=LAYERS, num_layers=8,
                                    logit_scale=-math.log(TAU), store_options=StoreOptions(**options))


def query(seed=1):
    q = np.random.default_rng(seed).standard_normal(DIM)
    return q / np.linalg.norm(q)


@pytest.fixture(scope="module")
def vectors():
    return gallery()


# ---------------------------------------------------------------- integrity
def test_a_flipped_byte_is_caught_by_a_plain_search(vectors, tmp_path):
    build(tmp_path / "idx", vectors, layer_store="int8")
    index = open_index(tmp_path / "idx")
    config = RerankConfig(top_k=5, rerank_k=50)
    top = search_embedding(index, query(), config)
    victim = int(top.results[0].item[4:9])  # img_XXXXX.png: a row the rerank reads
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    seg = manifest["segments"][victim // 700]
    path = tmp_path / "idx" / "segments" / seg["name"] / "int8.npy"
    data = bytearray(path.read_bytes())
    row = victim % 700
    data[len(data) - (700 - row) * 4 * DIM + 5] ^= 0x01  # one bit of that image's record
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError) as caught:
        search_embedding(open_index(tmp_path / "idx"), query(), config)
    message = str(caught.value)
    assert seg["name"] in message and f"row {row} " in message and top.results[0].item in message
    with pytest.raises(IndexCorruptError, match=seg["name"]):
        verify_index(tmp_path / "idx")


@pytest.mark.parametrize("part, width", [("final-int8.npy", DIM), ("layers-int4.npy", 3 * DIM // 2)])
def test_with_an_ivf_first_stage_the_reranked_records_are_checked_whole(vectors, tmp_path, part, width):
    """The refine reads only final rows, unchecked, to pick K; those K are read whole and checked: a flip in
    either part of a reranked image is caught, naming it."""
    build(tmp_path / "idx", vectors, index_factory="IVF16,PQ8", layer_store="int8+int4", rerank_k=50)
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["first_stage"]["refine"] > 1
    config = RerankConfig(top_k=5, rerank_k=50)
    top = search_embedding(open_index(tmp_path / "idx"), query(), config)
    victim = int(top.results[-1].item[4:9])  # a reranked image
    seg = json.loads((tmp_path / "idx" / "manifest.json").read_text())["segments"][victim // 700]
    path = tmp_path / "idx" / "segments" / seg["name"] / part
    data = bytearray(path.read_bytes())
    rows_in_segment = seg["count"]
    data[len(data) - (rows_in_segment - victim % 700) * width + 3] ^= 0x10  # one bit of that image's row(s)
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError) as caught:
        search_embedding(open_index(tmp_path / "idx"), query(), config)
    assert seg["name"] in str(caught.value) and top.results[-1].item in str(caught.value)


def test_an_index_without_row_checksums_opens_with_a_warning(vectors, tmp_path):
    build(tmp_path / "idx", vectors[:300], layer_store="fp16")
    root = tmp_path / "idx"
    manifest = json.loads((root / "manifest.json").read_text())
    for seg in manifest["segments"]:  # as format 2 wrote them
        meta_path = root / "segments" / seg["name"] / "meta.json"
        meta = json.loads(meta_path.read_text())
        for key in ("checksums", "store", "codec"):
            meta.pop(key)
        meta_path.write_text(json.dumps(meta))
        (root / "segments" / seg["name"] / "checksums.npy").unlink()
    manifest["format_version"] = 2
    for key in ("layer_store", "layer_codec_file", "layer_codec_sha256", "first_stage"):
        manifest.pop(key)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="before row checksums"):
        index = open_index(root)
    assert len(search_embedding(index, query(), RerankConfig(top_k=3, rerank_k=20)).results) == 3
    assert verify_index(root).count == 300


# ---------------------------------------------------------------- layer stores
def test_int8_store_is_per_vector_scaled_bytes(vectors):
    store = LayerStore("int8", 1 + len(LAYERS), DIM)
    codes, scales = store.encode(vectors[:50])
    reference_scale = np.abs(vectors[:50]).max(axis=-1) / 127  # an independent numpy statement of the format
    np.testing.assert_allclose(scales, reference_scale, rtol=1e-6)
    decoded = store.decode([codes, scales], [0, 2])
    assert np.abs(decoded - vectors[:50][:, [0, 2]]).max() <= reference_scale.max() / 2 + 1e-6


def test_int4_and_split_stores_against_numpy(vectors):
    v = vectors[:50].astype(np.float32)
    scale = np.abs(v).max(axis=-1) / 7  # int4: 4 bits a dimension, symmetric -7..7, two a byte
    codes = np.clip(np.round(v / scale[..., None]), -7, 7)
    packed = ((codes[..., 0::2] + 8) * 16 + (codes[..., 1::2] + 8)).astype(np.uint8)
    store = LayerStore("int4", 1 + len(LAYERS), DIM)
    got_packed, got_scales = store.encode(v)
    np.testing.assert_array_equal(got_packed, packed)
    np.testing.assert_allclose(got_scales, scale, rtol=1e-6)
    np.testing.assert_allclose(store.decode([got_packed, got_scales], [3, 1]), (codes * scale[..., None])[:, [3, 1]],
                               rtol=1e-6, atol=1e-7)
    split = LayerStore("int8+int4", 1 + len(LAYERS), DIM)  # final row int8, layer rows int4
    arrays = split.encode(v)
    assert [a.shape for a in arrays] == [(50, 1, DIM), (50, 1), (50, 3, DIM // 2), (50, 3)]
    assert split.bytes_per_image == DIM + 4 + 3 * (DIM // 2 + 4)
    final_scale = np.abs(v[:, 0]).max(axis=-1) / 127
    decoded = split.decode(arrays, [2, 0])
    np.testing.assert_allclose(decoded[:, 1], np.round(v[:, 0] / final_scale[:, None]) * final_scale[:, None],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(decoded[:, 0], codes[:, 2] * scale[:, 2, None], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("store", ["int8", "pq12", "int8+int4"])
def test_rerank_over_a_compressed_store_is_dola_over_its_decoded_rows(vectors, tmp_path, store):
    build(tmp_path / "idx", vectors, layer_store=store)
    index = open_index(tmp_path / "idx")
    decoded = index.vectors(np.arange(N), [0, 1, 2, 3]).transpose(1, 0, 2).astype(np.float64)  # (n, 1+J, D)
    if store == "int8":  # decoding itself, against numpy from the stored files
        assert np.abs(decoded - vectors).max() <= np.abs(vectors).max() / 254 + 1e-6
    q = query(3)
    result = search_embedding(index, q, RerankConfig(top_k=10, rerank_k=60, mode="dynamic"))
    # the exact first stage ranks the fp16 final rows; the rerank reads the store's layer rows
    first = decoded.copy()
    first[:, 0] = vectors[:, 0].astype(np.float16)
    hits, premature, _ = naive_search(first, q, top_k=10, rerank_k=60)
    assert [h.item for h in result.results] == [f"img_{i:05d}.png" for i, *_ in hits]
    assert result.premature_layer == premature
    np.testing.assert_allclose([h.score for h in result.results], [p for _, p, _, _ in hits], rtol=1e-3, atol=1e-6)


def test_store_names_are_checked():
    assert parse_store("pq", 1024) == "pq256" and parse_store("PQ512", 1024) == "pq512"
    assert parse_store("int8+int4", 1024) == "int8+int4" and parse_store("int8+int8", 1024) == "int8"
    for bad in ("pq7", "int3", "", "int8+int4+fp16", "pq8+pq16", "int4+"):
        with pytest.raises(ValueError, match="layer_store"):
            parse_store(bad, 1024)


# ---------------------------------------------------------------- first stage
def test_factory_choice_follows_size_and_memory():
    assert choose_factory(500_000, 1024, parse_memory("4G")) == "SQfp16"
    assert choose_factory(10_000_000, 1024, parse_memory("4G")) == "IVF4096,PQ128"
    assert choose_factory(10_000_000, 1024, parse_memory("1G")) == "IVF4096,PQ64"
    assert choose_factory(100_000_000, 1024, parse_memory("4G")) == "OPQ32_128,IVF8192,PQ32"
    assert "HNSW32" in choose_factory(5_000_000_000, 1024, parse_memory("200G"))
    assert parse_memory("512M") == 512 << 20 and parse_memory("2.5G") == int(2.5 * (1 << 30))
    with pytest.raises(ValueError, match="index_memory"):
        parse_memory("lots")
    with pytest.raises(ValueError, match="index_memory"):
        choose_factory(10**9, 1024, parse_memory("1G"))


def test_ivf_first_stage_meets_its_recall_against_brute_force(vectors, tmp_path):
    manifest = build(tmp_path / "idx", vectors, index_factory="IVF32,PQ12", target_recall=0.9, rerank_k=20,
                     layer_store="int8")
    stage = manifest.first_stage
    assert stage["factory"] == "IVF32,PQ12" and stage["search_params"].startswith("nprobe=")
    assert stage["recall"] >= 0.9 and stage["trained_on"] > 0
    index = open_index(tmp_path / "idx")
    ivf = faiss.extract_index_ivf(index.faiss_index)
    assert ivf.nprobe == int(stage["search_params"].split("=")[1])
    assert not isinstance(ivf.invlists, faiss.ArrayInvertedLists)  # memory-mapped, not read into RAM
    stored = vectors[:, 0].astype(np.float16).astype(np.float64)
    qs = [vectors[i, 0] + 0.3 * query(i) for i in range(30)]
    recalls = []
    for q in qs:
        q = q / np.linalg.norm(q)
        result = search_embedding(index, q, RerankConfig(top_k=20, rerank_k=20, mode="off"))
        exact = set(np.argsort(-(stored @ q), kind="stable")[:20])
        recalls.append(len(exact & {int(h.item[4:9]) for h in result.results}) / 20)
        # q_N of an approximate first stage is the stored final row's cosine, not the PQ score
        best = result.results[0]
        cosine = float(index.vectors(np.array([int(best.item[4:9])]), [0])[0, 0] @ q)
        assert best.baseline_score > 0 and np.isfinite(cosine)
    assert np.mean(recalls) >= 0.8


def test_index_add_appends_to_ivf_without_retraining_and_warns(vectors, tmp_path):
    small = gallery(30, seed=5)  # trained on 24 (6 held out to tune nprobe): < 1% of 3030
    build(tmp_path / "idx", small, index_factory="IVF4,Flat", layer_store="fp16")
    before = open_index(tmp_path / "idx")
    assert before.manifest.first_stage["trained_on"] == 24
    centroids = faiss.extract_index_ivf(before.faiss_index).quantizer.reconstruct_n(0, 4)
    from siglip_dola.retrieval.index import commit_segments
    from siglip_dola.retrieval import segment, storage
    manifest = storage.read_manifest(tmp_path / "idx")
    names = []
    for i in range(0, len(vectors), 1000):  # what add_to_index stages, without a model
        name = f"seg-add{i:06d}"
        segment.write_segment(tmp_path / "idx" / storage.STAGING / name, vectors[i:i + 1000],
                              [f"new_{j:05d}.png" for j in range(i, i + 1000)], [])
        names.append(name)
    with pytest.warns(RuntimeWarning, match="under 1%"):
        commit_segments(tmp_path / "idx", manifest, names, names, StoreOptions(layer_store="fp16"))
    after = open_index(tmp_path / "idx")
    assert len(after) == 30 + N
    np.testing.assert_array_equal(faiss.extract_index_ivf(after.faiss_index).quantizer.reconstruct_n(0, 4), centroids)
    q = vectors[1234, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = search_embedding(after, q, RerankConfig(top_k=1, rerank_k=10, mode="off"))  # nprobe from the build
    assert result.results[0].item.endswith("new_01234.png")


def test_tuning_scores_each_refine_factor_as_its_own_search_would(vectors):
    """tune() scores every refine factor from one k x 16 fetch per nprobe; each must equal a search that
    fetches k x factor itself and keeps the k best by the float64 cosines (ties in PQ distances aside)."""
    from siglip_dola.retrieval import first_stage

    finals = vectors[:, 0]
    index = first_stage.train("IVF16,PQ6", DIM, finals[:2000].astype(np.float32))
    index.add(finals.astype(np.float32))
    queries = np.stack([query(i) for i in range(40)])
    exact = np.argsort(-(queries @ finals.T), axis=1, kind="stable")[:, :20]

    def rescore(ids):
        return np.einsum("qkd,qd->qk", finals[np.maximum(ids, 0)], queries)
    params, measured, factor = first_stage.tune(index, queries, exact, 20, 0.999, rescore)
    assert params.startswith("nprobe=") and factor in first_stage.REFINE_FACTORS
    first_stage.apply_params(index, params)
    assert measured == pytest.approx(first_stage.recall(index, queries, exact, 20, factor, rescore), abs=0.01)
    for other in (1, 4):  # any factor, at the chosen nprobe, against its own search
        ids = index.search(queries.astype(np.float32), 20 * other)[1]
        kept = ids if other == 1 else np.take_along_axis(ids, np.argsort(-np.where(ids >= 0, rescore(ids), -np.inf),
                                                                           axis=1, kind="stable")[:, :20], axis=1)
        naive = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(kept.tolist(), exact.tolist())])
        assert first_stage.recall(index, queries, exact, 20, other, rescore) == pytest.approx(naive)
