"""The one JSON vocabulary of `classify`, `rerank` and `search` (see docs/output.md).

    {"results": [{"query": "<image path or query text>", "query_type": "image" | "text",
                  "item_type": "label" | "text" | "path" | "caption",
                  "premature_layer": 20 | null, "jsd": {"18": 0.1, ...},
                  "hits": [{"rank": 1, "item": "...", "score": p_hat, "baseline_score": q_N,
                            "rank_baseline": 3 (search only: 1-based first-stage rank)}, ...]}],
     "skipped": [{"path": "...", "error": "..."}]}

Every command adds its provenance (e.g. "settings") next to these two keys; none renames them.
"""
from __future__ import annotations

QUERY_TYPES = ("image", "text")
ITEM_TYPES = ("label", "text", "path", "caption")


def result_row(query, query_type: str, item_type: str, hits: list[dict], premature_layer, jsd=None) -> dict:
    """One query's row; hits [{"item", "score", "baseline_score", ...}] best first get their 1-based rank."""
    assert query_type in QUERY_TYPES and item_type in ITEM_TYPES, (query_type, item_type)
    ranked = [{"rank": rank, **hit} for rank, hit in enumerate(hits, start=1)]
    return {"query": str(query), "query_type": query_type, "item_type": item_type,
            "premature_layer": premature_layer,
            "jsd": {str(layer): float(value) for layer, value in (jsd or {}).items()}, "hits": ranked}


def scorer_row(result: dict, query_key: str, items_key: str, item_key: str, item_type: str) -> dict:
    """A DoLaSigLIP.classify / rerank / rerank_images row -> `result_row` (the library rows stay as they are)."""
    query_type = "text" if query_key == "text" else "image"
    hits = [{"item": str(hit[item_key]), "score": hit["score"], "baseline_score": hit["baseline_score"]}
            for hit in result[items_key]]
    return result_row(result[query_key], query_type, item_type, hits, result["premature_layer"], result["jsd"])


def results_json(rows: list[dict], skipped: list[dict]) -> dict:
    """The output document: {"results": rows, "skipped": [{"path", "error"}]}."""
    return {"results": rows, "skipped": [{"path": str(s["path"]), "error": str(s["error"])} for s in skipped]}
