"""Zero-shot metrics from scores: top-k accuracy, mean per-class recall, retrieval recall@k.

Names follow clip_benchmark: `acc1`, `acc5`, `mean_per_class_recall`; for retrieval
`text_retrieval_recall@k` (image -> text) and `image_retrieval_recall@k` (text -> image).
"""
from __future__ import annotations

import torch

from siglip_dola import scoring


def rank_scores(result: scoring.DoLaResult) -> torch.Tensor:
    """Ranking score [..., C]: kept classes by DoLa probability first, masked ones after them by q_N.

    Masked classes have p_hat = 0 exactly, so without the q_N fallback their order (and top-5) would be
    arbitrary. Kept classes score 2 + p_hat > 1 >= q_N of any masked class.
    """
    kept = torch.isfinite(result.log_probs)
    return torch.where(kept, 2.0 + result.probs, result.final_probs)


def hits_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """[n] bool: does row i's top-k (by scores [n, C]) contain a target (targets [n, C] bool)?"""
    k = min(k, scores.shape[-1])
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]  # (n, k) ties: lower index
    return targets.gather(-1, top).any(dim=-1)


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels [n] int64 -> targets [n, C] bool."""
    return torch.nn.functional.one_hot(labels, num_classes).bool()


def mean_per_class_recall(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in labels of the fraction of that class predicted correctly."""
    recalls = [(predicted[labels == c] == c).float().mean() for c in labels.unique()]
    return float(torch.stack(recalls).mean())


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """{acc1, acc5, mean_per_class_recall} for scores [n, C] and labels [n]."""
    targets = one_hot_targets(labels, scores.shape[-1])
    predicted = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, 0]
    return {"acc1": float(hits_at_k(scores, targets, 1).float().mean()),
            "acc5": float(hits_at_k(scores, targets, 5).float().mean()),
            "mean_per_class_recall": mean_per_class_recall(predicted, labels)}


def retrieval_hits(image_to_text: torch.Tensor, text_to_image: torch.Tensor,
                   text_image: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """{recall key: [queries] bool hit}: image_to_text [I, T] and text_to_image [T, I] scores, text_image [T]
    the image of each text. `text_retrieval_recall@k` is per image query, `image_retrieval_recall@k` per text."""
    n_images = image_to_text.shape[0]
    t2i_targets = one_hot_targets(text_image, n_images)  # (T, I)
    hits = {}
    for k in ks:
        hits[f"text_retrieval_recall@{k}"] = hits_at_k(image_to_text, t2i_targets.T, k)  # (I,)
        hits[f"image_retrieval_recall@{k}"] = hits_at_k(text_to_image, t2i_targets, k)  # (T,)
    return hits


def retrieval_metrics(hits: dict) -> dict:
    """Recall@k both ways (clip_benchmark's keys) from retrieval_hits' per-query hits."""
    return {key: float(hit.float().mean()) for key, hit in hits.items()}
