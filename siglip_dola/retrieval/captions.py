"""Image -> captions search: the same two stages as text -> images, with the roles swapped.

The query image gives z_N and z_j (one readout call); the captions give t_c. The first stage keeps the
rerank-k captions of highest cos(z_N, t_c) (FAISS inner product), then DoLa runs over those captions:
q_N(c) = softmax_c(cos(z_N, t_c) / tau), q_j(c) from layer j's image embedding.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from siglip_dola.dependencies import require
from siglip_dola.embedding.images import embed_images
from siglip_dola.embedding.texts import embed_texts
from siglip_dola.retrieval import faiss_store
from siglip_dola.retrieval.search import RerankConfig, SearchResult, _hits, check_config, rerank
from siglip_dola.settings import settings_for_model
from siglip_dola.tasks import RETRIEVAL

faiss = require("faiss", "retrieval", "image indexes and search")

CAPTION_COLUMNS = ("caption", "text")


def read_captions(path) -> list[str]:
    """Captions from a UTF-8 .txt (one per line) or .csv (column 'caption' or 'text', else the first column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions: {str(path)!r} is not a file")
    with open(path, encoding="utf-8", newline="") as handle:
        if path.suffix.lower() == ".csv":
            rows = list(csv.reader(handle))
            header = [cell.strip().lower() for cell in rows[0]] if rows else []
            column = next((header.index(name) for name in CAPTION_COLUMNS if name in header), None)
            body = rows[1:] if column is not None else rows
            captions = [row[column or 0].strip() for row in body if row]
        else:
            captions = [line.strip() for line in handle]
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"captions: {str(path)!r} holds no captions (.txt: one per line; .csv: a 'caption' column)")
    return captions


def encode_captions(model, captions: list[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised caption embeddings [C, D] float32."""
    embeds = embed_texts(model, captions, batch_size, needed_for="caption search")  # (C, D)
    return torch.nn.functional.normalize(embeds, dim=-1).numpy()


def _image_embeds(model, image, layers: list[int]) -> np.ndarray:
    """Normalised [1+J, D]: row 0 the final embedding, then `layers`, for an image path or PIL image."""
    item = str(image) if isinstance(image, (str, Path)) else ("<image>", image)
    embeddings = embed_images(model, [item], layers, batch_size=1, progress=False, workers=0)
    if embeddings.skipped:
        raise ValueError(f"image {embeddings.skipped[0][0]!r} could not be read: {embeddings.skipped[0][1]}")
    stacked = torch.cat([embeddings.z_final, embeddings.z_layers[:, 0]])  # (1+J, D)
    return torch.nn.functional.normalize(stacked, dim=-1).numpy()


def search_captions(model, image, captions, config: RerankConfig | None = None, bucket=None,
                    caption_embeds: np.ndarray | None = None, n_buckets=None, **options) -> SearchResult:
    """Image (path or PIL) -> ranked captions (list[str] or a caption file path).

    Settings (siglip_dola.settings): config's flags and `bucket` > config.calibration > the model's own
    (the embedded model's shipped retrieval calibration) > defaults. caption_embeds [C, D] may be passed to
    skip encoding. options: RerankConfig fields.
    """
    config = config or RerankConfig(**options)
    check_config(config)
    captions = read_captions(captions) if isinstance(captions, (str, Path)) else list(captions)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions must be a caption file path or a non-empty list of str")
    settings = config.settings or settings_for_model(model, config.calibration, task=RETRIEVAL, bucket=bucket,
                                                     n_buckets=n_buckets, **config.flags())
    layers = settings.layers
    embeds = encode_captions(model, captions) if caption_embeds is None else np.asarray(caption_embeds, np.float32)
    image_embeds = _image_embeds(model, image, layers)  # (1+J', D)
    gallery = faiss.IndexFlatIP(embeds.shape[1])
    gallery.add(np.ascontiguousarray(embeds))
    k = min(config.rerank_k, len(captions))
    cosines, ids = faiss_store.search(gallery, image_embeds[0], k)  # (K,), (K,)
    layer_logits = embeds[ids] @ image_embeds[1:].T / model.tau if layers else None  # (K, J)
    order, probs, baseline, premature, jsd = rerank(cosines / model.tau, None if layer_logits is None else
                                                    np.ascontiguousarray(layer_logits.T), settings, config.top_k)
    query = str(image) if isinstance(image, (str, Path)) else "<image>"
    return SearchResult(query, _hits(captions, ids, order, probs, baseline), premature, item_key="caption",
                        settings=settings, jsd=jsd)
