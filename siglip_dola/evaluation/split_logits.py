"""A split embedded once and its per-layer log-probs: what calibration and evaluation both score.

The images go through the model once (all layers 1..N-1 in one readout call per batch, embedding/); the log-probs
of every layer are then LayerLogits (layer_logits.py, chunked): classification against the class prompts (or a
precomputed bank), retrieval text -> image over the captions.
"""
from __future__ import annotations

import torch

from siglip_dola import scoring
from siglip_dola.data.datasets import load_dataset
from siglip_dola.data.eval_dataset import EvalDataset
from siglip_dola.embedding.images import Embeddings, embed_images
from siglip_dola.embedding.texts import embed_texts
from siglip_dola.evaluation.layer_logits import LayerLogits
from siglip_dola.tasks import CLASSIFICATION
from siglip_dola.text_bank.bank import TextBank, bank_for_classes
from siglip_dola.text_bank.build import build_text_bank


def all_layers(model) -> list[int]:
    """Every candidate layer 1..N-1 of the model."""
    return list(range(1, model.readout.num_layers))


def as_dataset(dataset, split: str | None, n: int | None, default_split: str = "test") -> EvalDataset:
    """An EvalDataset from a dataset object or a name/path accepted by datasets.load_dataset (split None:
    `default_split` where the dataset has one, else all of it)."""
    return dataset if isinstance(dataset, EvalDataset) else load_dataset(dataset, split, n, default_split=default_split)


def embed_dataset(model, dataset: EvalDataset, batch_size: int = 32, progress: bool = True,
                  workers: int | None = None, decode: str = "cpu") -> Embeddings | None:
    """Embed every item with all layers 1..N-1 in one pass (decode: 'cpu' or 'gpu', see embed_images); None on
    torchrun ranks other than 0."""
    embeddings = embed_images(model, dataset.items, all_layers(model), batch_size=batch_size, progress=progress,
                              workers=workers, decode=decode)
    if embeddings is not None and not embeddings.ids:
        from siglip_dola.failures import all_failed_message

        raise ValueError(f"dataset {dataset.name!r} split {dataset.split!r}: no image could be read: "
                         + all_failed_message("images", embeddings.skipped))
    return embeddings


def class_logits(model, dataset: EvalDataset, embeddings: Embeddings, bank: TextBank | None = None) -> LayerLogits:
    """Class log-probs of the images (final [n, C] kept, layers per chunk) against the dataset's class prompts
    (or a precomputed `bank`, its rows matched to the class names)."""
    if not dataset.classnames:
        raise ValueError(f"dataset {dataset.name!r} has no class labels (classification needs path,label data)")
    bank = build_text_bank(model, dataset.classnames, dataset.templates) if bank is None else \
        bank_for_classes(bank, dataset.classnames, model)
    bank = bank.embeds.float().cpu()  # (C, D)
    final = scoring.build_log_probs_from_rep(embeddings.z_final, bank, model.tau)  # (n, C)
    labels = torch.tensor([dataset.labels[i] for i in embeddings.indices], dtype=torch.int64)
    if bool((labels < 0).any()):
        raise ValueError(f"dataset {dataset.name!r}: some images have no class label")
    return LayerLogits(final, labels, embeddings, model.tau, row_layers=embeddings.z_layers, columns=bank)


def text_embeds(model, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Raw text embeddings [T, D] fp32 cpu (embedding.texts: the one text loop)."""
    return embed_texts(model, texts, batch_size, needed_for="retrieval")


def caption_pairs(dataset: EvalDataset, embeddings: Embeddings) -> tuple[list[str], torch.Tensor]:
    """(every caption of the embedded images, text_image [T]: the position of each caption's image)."""
    captions = [dataset.captions[i] for i in embeddings.indices]
    texts = [c for caps in captions for c in caps]
    if not texts:
        raise ValueError(f"dataset {dataset.name!r} has no captions: retrieval needs image-caption pairs")
    return texts, torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.int64)


def text_to_image_logits(model, text: torch.Tensor, text_image: torch.Tensor, embeddings: Embeddings) -> LayerLogits:
    """Text -> image log-probs over the images (final [T, I] kept; layer j: the images' layer-j embeddings)."""
    final = scoring.build_log_probs_from_rep(text, embeddings.z_final, model.tau)  # (T, I)
    return LayerLogits(final, text_image, embeddings, model.tau, rows=text, column_layers=embeddings.z_layers)


def task_logits(model, dataset: EvalDataset, embeddings: Embeddings, task: str, bank=None) -> LayerLogits:
    """The split's LayerLogits for `task`: images against class prompts (or `bank`), or captions -> images."""
    if task == CLASSIFICATION:
        return class_logits(model, dataset, embeddings, bank)
    if bank is not None:
        raise ValueError("bank is used for classification only; retrieval encodes the dataset's captions")
    texts, text_image = caption_pairs(dataset, embeddings)
    return text_to_image_logits(model, text_embeds(model, texts), text_image, embeddings)
