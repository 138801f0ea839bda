"""The one text loop: text banks, caption search, calibration and `DoLaSigLIP` text inputs all embed texts here."""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from siglip_dola.embedding.pixel_batches import check_batch_size


def embed_texts(model, texts: Sequence[str], batch_size: int = 256, needed_for: str = "text embeddings",
                progress: bool = True) -> torch.Tensor:
    """Raw (not normalised) text embeddings [T, D] fp32 cpu, `batch_size` texts per encoder call; a progress
    bar (stderr) when `progress` and there is more than one batch.

    ValueError naming `needed_for` when the model has no text tower.
    """
    if model.encode_text is None:
        raise ValueError(f"model {model.model_id!r} has no text tower: {needed_for} need one")
    check_batch_size(batch_size)
    texts = list(texts)
    if not texts:
        return torch.zeros(0, model.readout.embed_dim)
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        return torch.cat([model.encode_text(texts[i:i + batch_size]).float().cpu()
                          for i in tqdm(starts, desc=f"encoding {len(texts)} texts", unit="batch",
                                        disable=not progress or len(starts) <= 1)])
