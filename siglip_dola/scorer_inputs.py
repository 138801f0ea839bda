"""What DoLaSigLIP accepts, turned into what it scores; each wrong input is a ValueError/TypeError naming it.

images -> the embedding loop's items; bank -> (labels, embeds [C, D]); text -> (names, embeds [Q, D]);
precomputed image embeddings -> the scorer's layers out of the stored ones.
"""
from __future__ import annotations

import os

import torch

from siglip_dola.data.images import expand_image_paths
from siglip_dola.embedding.texts import embed_texts


def check_pixels(pixels, packed: bool = False) -> None:
    """ValueError unless pixels is [B, 3, H, W]; packed: the model takes packed NaFlex patches [B, 1+P, C*p*p]
    (readout.tower_hf_siglip2.pack), not images."""
    ok = isinstance(pixels, torch.Tensor) and (pixels.ndim == 3 if packed else pixels.ndim == 4 and pixels.shape[1] == 3)
    if not ok:
        shape = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        expected = "packed NaFlex patches [B, 1+P, C*p*p]" if packed else "[B, 3, H, W]"
        raise ValueError(f"images must be a {expected} tensor, got {shape}")


def check_top_k(top_k) -> int:
    """top_k as a positive int (ValueError otherwise; bools are not counts)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return top_k


def check_bank_dim(embeds, embed_dim: int, what: str = "bank") -> None:
    """Raise a clear ValueError unless embeds is [C, D] with D == embed_dim."""
    if embeds.ndim != 2 or embeds.shape[0] < 1 or embeds.shape[1] != embed_dim:
        raise ValueError(f"{what} must be [C, D] with D={embed_dim} (the model's embedding dimension), "
                         f"got shape {list(embeds.shape)}")


def image_items(images, packed: bool = False) -> tuple:
    """(items for the embedding loop, whether ids are input positions) from a [B, 3, H, W] tensor,
    PIL images or paths/folders/globs."""
    if isinstance(images, torch.Tensor):
        check_pixels(images, packed)
        return images, True
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    images = list(images)
    if images and all(isinstance(i, (str, os.PathLike)) for i in images):
        return [str(p) for p in expand_image_paths(images)], False
    if images and all(hasattr(i, "convert") for i in images):  # PIL images
        return [(str(i), image) for i, image in enumerate(images)], True
    raise TypeError("images must be a [B, 3, H, W] tensor, a list of PIL images, or paths/folders/globs; "
                    f"got {type(images).__name__} of {sorted({type(i).__name__ for i in images})}")


def bank_rows(bank, model) -> tuple[list[str], torch.Tensor]:
    """(labels, embeds [C, D]) from a TextBank, a list of label strings (encoded by `model`), or an [C, D] tensor."""
    if isinstance(bank, (list, tuple)) and all(isinstance(b, str) for b in bank):
        from siglip_dola.text_bank.build import build_text_bank
        bank = build_text_bank(model, list(bank))
    if isinstance(bank, torch.Tensor):
        labels, embeds = [str(i) for i in range(bank.shape[0])], bank
    elif hasattr(bank, "embeds") and hasattr(bank, "labels"):
        labels, embeds = list(bank.labels), bank.embeds
    else:
        raise TypeError(f"bank must be a TextBank, a list of label strings or a [C, D] tensor, got {type(bank).__name__}")
    check_bank_dim(embeds, model.readout.embed_dim)
    if not isinstance(bank, torch.Tensor):
        from siglip_dola.text_bank.bank import check_bank
        check_bank(bank, model)  # the bank/model policy lives with the banks
    if len(labels) != embeds.shape[0]:
        raise ValueError(f"bank has {len(labels)} labels but {embeds.shape[0]} embedding rows")
    return labels, embeds


def text_queries(text, model) -> tuple[list[str], torch.Tensor]:
    """(query names, raw text embeddings [Q, D]) from a string, list of strings or [D] / [Q, D] tensor."""
    if isinstance(text, torch.Tensor):
        embeds = text.reshape(1, -1) if text.ndim == 1 else text
        return [str(i) for i in range(embeds.shape[0])], embeds.float()
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("text must be a non-empty string, a list of non-empty strings or an embedding tensor")
    if model.encode_text is None:
        raise ValueError(f"model {model.model_id!r} has no text tower: pass text as an embedding tensor [Q, D]")
    return texts, embed_texts(model, texts)


def select_layers(image_embeds, embed_layers, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z_final [n, D], z_layers [J, n, D] for `layers`, or None without layers) out of precomputed
    image_embeds (z_final [n, D], z_layers [L, n, D]) whose L layers `embed_layers` names (default: `layers`)."""
    z_final, z_layers = image_embeds
    z_final = torch.as_tensor(z_final).float()
    if not layers:
        return z_final, None
    z_layers = torch.as_tensor(z_layers).float()
    stored = list(layers if embed_layers is None else embed_layers)
    if z_layers.ndim != 3 or z_layers.shape[0] != len(stored) or z_layers.shape[1:] != z_final.shape:
        raise ValueError(f"image_embeds z_layers must be [L={len(stored)}, n, D] matching z_final "
                         f"{list(z_final.shape)}, got {list(z_layers.shape)}")
    missing = [j for j in layers if j not in stored]
    if missing:
        raise ValueError(f"image_embeds lack layers {missing} (stored: {stored}); the scorer needs {layers}")
    return z_final, z_layers[[stored.index(j) for j in layers]]
