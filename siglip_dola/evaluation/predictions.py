"""Per-item predictions of `eval --predictions FILE.jsonl`: one JSON object per image (or text query), in input order.

Classification rows: {"index", "id", "label", "label_index", "modes": {mode: {"top5": [{"label", "index",
"prob"}], "true_prob", and for DoLa modes "premature_layer", "head_set_size", "jsd": {layer: value}}}}.
Retrieval rows (text -> image, one per caption): {"index", "query", "gold": [image id], "modes": {mode:
{"top10": [{"id", "score"}], and for DoLa modes "premature_layer", "head_set_size", "jsd"}}}.
"prob" / "score" is the mode's own probability (DoLa's p_hat, 0 outside the head set; q_N for off); the
order is the mode's ranking (metrics.rank_scores). Rows are built on rank 0 from the gathered, scored split.
"""
from __future__ import annotations

import json
import os

import torch

from siglip_dola import scoring
from siglip_dola.modes import BASELINE
from siglip_dola.evaluation.metrics import rank_scores
from siglip_dola.io import atomic_path


def _ranked(result: scoring.DoLaResult, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """(top-k columns [n][k] in the mode's order, their probabilities [n][k])."""
    k = min(k, result.probs.shape[-1])
    order = torch.sort(rank_scores(result), dim=-1, descending=True, stable=True).indices[:, :k]  # (n, k)
    return order.tolist(), result.probs.gather(-1, order).tolist()


def _dola_fields(result: scoring.DoLaResult, layers: list[int]) -> tuple[list, list, list]:
    """Per row: premature layer, head-set size |V| and {layer: JSD(q_N || q_layer)} over the candidates."""
    premature = result.premature_layer.tolist()
    head = torch.isfinite(result.log_probs).sum(dim=-1).tolist()  # (n,)
    jsd = result.jsd.T.tolist()  # (n, J)
    return premature, head, [{str(j): float(v) for j, v in zip(layers, row)} for row in jsd]


def _mode_rows(result: scoring.DoLaResult, point, k: int, name_of) -> list[dict]:
    """The `modes[mode]` entry of every row: top-k entries (name_of(column, prob) -> dict) and DoLa fields."""
    order, probs = _ranked(result, k)
    rows = [{f"top{k}": [name_of(c, p) for c, p in zip(cols, ps)]} for cols, ps in zip(order, probs)]
    if point.mode != BASELINE:   # point: the mode's DoLaSettings
        for row, premature, head, jsd in zip(rows, *_dola_fields(result, point.layers)):
            row.update(premature_layer=int(premature), head_set_size=int(head), jsd=jsd)
    return rows


def classification_rows(ids: list[str], indices: list[int], labels: torch.Tensor, classnames: list[str],
                        results: dict, points: dict, k: int = 5) -> list[dict]:
    """One row per image (ids/indices [n], labels [n]) from {mode: DoLaResult over [n, C]} and {mode: point}."""
    per_mode = {}
    for mode, result in results.items():
        entries = _mode_rows(result, points[mode], k, lambda c, p: {"label": classnames[c], "index": c, "prob": p})
        true_prob = result.probs.gather(-1, labels[:, None])[:, 0].tolist()  # (n,)
        for entry, prob in zip(entries, true_prob):
            entry["true_prob"] = prob
        per_mode[mode] = entries
    return [{"index": int(index), "id": item_id, "label": classnames[int(label)], "label_index": int(label),
             "modes": {mode: entries[i] for mode, entries in per_mode.items()}}
            for i, (index, item_id, label) in enumerate(zip(indices, ids, labels.tolist()))]


def retrieval_rows(texts: list[str], text_image: torch.Tensor, image_ids: list[str], results: dict,
                   points: dict, k: int = 10) -> list[dict]:
    """One row per text query (texts [T], text_image [T]) from {mode: text -> image DoLaResult over [T, I]}."""
    per_mode = {mode: _mode_rows(result, points[mode], k, lambda c, p: {"id": image_ids[c], "score": p})
                for mode, result in results.items()}
    return [{"index": q, "query": text, "gold": [image_ids[int(image)]],
             "modes": {mode: entries[q] for mode, entries in per_mode.items()}}
            for q, (text, image) in enumerate(zip(texts, text_image.tolist()))]


def write_predictions(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows as JSON Lines, atomically (a crash never leaves a partial file posing as complete)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, allow_nan=False) + "\n")
