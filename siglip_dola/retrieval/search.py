"""Text -> images search: FAISS first stage on final embeddings, then DoLa over the top rerank-k images.

For a query text t and the first stage's K candidate images, the "vocabulary" of DoLa is those K
images: q_N(i) = softmax_i(cos(z_N(i), t) / tau), q_j(i) likewise from layer j's stored embedding, and
``scoring.dola`` picks M (dynamic: argmax_j JSD(q_N || q_j); static: fixed) and returns p_hat over the
K images. Results are ordered by p_hat, then q_N (images outside V_head have p_hat = 0 and keep their
first-stage order after the kept ones).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from siglip_dola import scoring
from siglip_dola.embedding.texts import embed_texts
from siglip_dola.modes import BASELINE, mode_of
from siglip_dola.retrieval import faiss_store, first_stage
from siglip_dola.retrieval.index import index_settings
from siglip_dola.retrieval.opened import RetrievalIndex, check_compatible, open_index
from siglip_dola.settings import DoLaSettings


@contextmanager
def _small_torch_ops():
    """One torch thread for the tiny per-query tensors (K x J): with several, torch's OpenMP threads and
    FAISS's spin against each other and a query took 10-30x longer on a 2-core machine. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class SearchHit:
    """One result: `item` (image path or caption), DoLa score p_hat, baseline q_N, 1-based first-stage rank."""
    item: str
    score: float
    baseline_score: float
    rank_baseline: int


@dataclass
class SearchResult:
    """Ranked hits of one query; premature_layer is None for mode "off"; item_key names `item` in JSON."""
    query: str
    results: list[SearchHit]
    premature_layer: int | None
    item_key: str = "path"
    settings: DoLaSettings | None = None
    jsd: dict[int, float] | None = None  # JSD(q_N || q_j) per candidate layer j over the K candidates

    def to_json(self) -> dict:
        """One row of the shared output vocabulary (siglip_dola/output.py): query, hits [{rank, item, ...}]."""
        from siglip_dola.output import result_row

        hits = [{"item": h.item, "score": h.score, "baseline_score": h.baseline_score,
                 "rank_baseline": h.rank_baseline} for h in self.results]
        query_type = "image" if self.item_key == "caption" else "text"
        return result_row(self.query, query_type, self.item_key, hits, self.premature_layer, self.jsd)


@dataclass
class RerankConfig:
    """How to rerank: sizes, and either a resolved `settings` (a DoLaSettings, used as is) or the DoLa settings
    flags (None = not given: from `calibration`, else the index's stored settings, else the defaults; see
    siglip_dola.settings)."""
    top_k: int = 10
    rerank_k: int = 100
    settings: DoLaSettings | None = None
    mode: str | None = None
    alpha: float | None = None
    static_layer: int | None = None
    layers: list[int] | None = None
    contrast_weight: float | None = None
    calibration: str | None = None  # a calibrate JSON, "embedded" or "none"

    def flags(self) -> dict:
        """The settings flags, as resolve_settings keywords."""
        return {"mode": self.mode, "alpha": self.alpha, "static_layer": self.static_layer, "layers": self.layers,
                "contrast_weight": self.contrast_weight}


def check_config(config: RerankConfig) -> None:
    """ValueError/TypeError naming the bad field and the valid values."""
    for name in ("top_k", "rerank_k"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.rerank_k < config.top_k:
        raise ValueError(f"rerank_k ({config.rerank_k}) must be >= top_k ({config.top_k})")
    if config.mode is not None:
        mode_of(config.mode)
    if config.settings is not None and (config.calibration is not None or any(
            v is not None for v in config.flags().values())):
        raise ValueError("give either settings (a resolved DoLaSettings) or the settings flags "
                         f"{sorted(config.flags())} / calibration, not both")


def rerank(first_logits: np.ndarray, layer_logits: np.ndarray | None, settings: DoLaSettings, top_k: int):
    """DoLa over K candidates: first_logits [K], layer_logits [J, K] (J = settings.layers)
    -> (order [<=top_k], p_hat [K], q_N [K], M, {j: JSD(q_N || q_j)} or None for "off")."""
    layers = settings.layers
    off = settings.mode == BASELINE or layer_logits is None or not len(layers)
    result = scoring.dola(first_logits, None, mode=BASELINE) if off else scoring.dola(first_logits, layer_logits,
                                                                                       settings)
    probs, baseline = np.asarray(result.probs), np.asarray(result.final_probs)
    first_rank = np.arange(len(first_logits))
    order = np.lexsort((first_rank, -baseline, -probs))  # p_hat desc, then q_N desc, then first stage
    premature = None if off else int(result.premature_layer)
    jsd = None if off else {int(j): float(v) for j, v in zip(layers, np.asarray(result.jsd).reshape(-1))}
    return order[:top_k], probs, baseline, premature, jsd


def _hits(items: list[str], candidate_ids, order, probs, baseline) -> list[SearchHit]:
    return [SearchHit(items[int(candidate_ids[i])], float(probs[i]), float(baseline[i]), int(i) + 1)
            for i in order]


def search_embedding(index: RetrievalIndex, text_embed, config: RerankConfig | None = None,
                     query: str = "", tau: float | None = None) -> SearchResult:
    """Search with a text embedding [D] (raw or normalised); tau defaults to the index model's."""
    config = config or RerankConfig()
    check_config(config)
    settings = index_settings(index.manifest, config.calibration, root=index.root, given=config.settings,
                              **config.flags())
    layers = settings.layers
    text = np.asarray(text_embed, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(text))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("text_embed must be finite and non-zero")
    text = text / norm
    if text.shape[0] != index.manifest.embed_dim:
        raise ValueError(f"text_embed must have D={index.manifest.embed_dim} entries, got {text.shape[0]}")
    tau = index.tau if tau is None else float(tau)
    k = min(config.rerank_k, len(index))
    if k == 0:
        return SearchResult(query, [], None, settings=settings)
    if k == 1:
        warnings.warn("only one candidate to rank (rerank_k or the index holds 1): it always scores 1.0; "
                      "ranking needs at least 2 candidates", UserWarning, stacklevel=2)
    stage = index.manifest.first_stage or {}
    exact = first_stage.is_exact(stage.get("factory", first_stage.EXACT))
    rows = [1 + index.layers.index(j) for j in layers]
    if exact:
        cosines, ids = faiss_store.search(index.faiss_index, text, k)  # (K,), (K,)
        stored = index.vectors(ids, rows) if rows else None  # (R, K, D), records checked against their checksums
    else:  # approximate: fetch refine x K, keep the K best by the stored final rows (build-tuned to the recall)
        _, fetched = faiss_store.search(index.faiss_index, text, min(len(index), k * int(stage.get("refine", 1))))
        fetched = fetched[fetched >= 0]
        finals = index.final_rows(fetched) @ text  # (K',), only the final rows' files read
        ids = fetched[np.lexsort((np.arange(len(fetched)), -finals))[:k]]
        stored = index.vectors(ids, [0] + rows)  # (1+R, K, D): the K records read whole and checked
        cosines, stored = stored[0] @ text, (stored[1:] if rows else None)
    with _small_torch_ops():
        layer_logits = None
        if rows:  # torch, not numpy: numpy's BLAS threads would spin against FAISS's as well
            layer_logits = (torch.from_numpy(stored) @ torch.from_numpy(text)).numpy() / tau  # (J, K)
        order, probs, baseline, premature, jsd = rerank(cosines / tau, layer_logits, settings, config.top_k)
    return SearchResult(query, _hits(index.paths, ids, order, probs, baseline), premature, settings=settings,
                        jsd=jsd)


def search(index, query: str, model=None, config: RerankConfig | None = None, **options) -> SearchResult:
    """Text query -> ranked images. `index`: path or RetrievalIndex; `model`: LoadedModel (default: load
    the index's model id); options: RerankConfig fields (top_k, rerank_k, mode, alpha, static_layer, layers,
    contrast_weight, calibration). Settings: flags > `calibration` > the index's stored settings > defaults.
    """
    if not isinstance(query, str) or not query:
        raise TypeError(f"query must be a non-empty str, got {query!r}")
    config = config or RerankConfig(**options)
    if not isinstance(index, RetrievalIndex):
        index = open_index(index, model=model)
    if model is None:
        from siglip_dola.loading import load
        model = load(index.manifest.model_id)
    else:
        check_compatible(index.manifest, model, root=index.root)  # same weights, however they are named
    text_embed = embed_texts(model, [query], needed_for="text queries")[0]  # (D,)
    return search_embedding(index, text_embed, config, query=query, tau=model.tau)
