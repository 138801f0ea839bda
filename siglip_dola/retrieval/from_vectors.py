"""Write an index from precomputed embeddings (benchmarks with synthetic galleries, embeddings made elsewhere)."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from siglip_dola.retrieval import layer_store, segment, storage
from siglip_dola.index_options import StoreOptions
from siglip_dola.retrieval.commit import check_options
from siglip_dola.retrieval.index import commit_segments
from siglip_dola.retrieval.storage import Manifest


def _normalised(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def build_index_from_vectors(out, chunks: Iterable[tuple[list[str], np.ndarray]], model_id: str,
                             layers: list[int], num_layers: int, logit_scale: float,
                             preprocessing: str = "precomputed embeddings",
                             store_options: StoreOptions | None = None) -> Manifest:
    """Index at `out` from chunks of (paths [n], vectors [n, 1+J, D]: row 0 final, rows 1..J `layers`).

    Vectors are L2-normalised; each chunk becomes one segment, staged (and, for a store without a codec,
    encoded) as it arrives, so a generator of chunks is never held whole. Same layer store,
    first stage (`store_options`) and atomic commit as ``build_index``; one process.
    """
    root, names, dim, store = Path(out), [], None, None
    options = store_options or StoreOptions()
    for number, (paths, vectors) in enumerate(chunks):
        vectors = np.asarray(vectors)
        if vectors.ndim != 3 or vectors.shape[0] != len(paths) or vectors.shape[1] != 1 + len(layers):
            raise ValueError(f"chunk {number}: vectors must be [n, 1+J, D] = [{len(paths)}, {1 + len(layers)}, D], "
                             f"got {list(vectors.shape)}")
        if dim is None:
            dim = vectors.shape[2]
            check_options(options, int(dim))
            store = layer_store.store_named(options.layer_store, 1 + len(layers), int(dim))
        name = f"seg-{uuid.uuid4().hex[:24]}"  # fresh: never reuses a segment of an earlier index here
        segment.write_segment(root / storage.STAGING / name, _normalised(vectors), list(paths), [], store)
        names.append(name)
    if dim is None:
        raise ValueError("chunks must hold at least one chunk of vectors")
    manifest = Manifest(model_id=model_id, layers=list(layers), num_layers=int(num_layers), embed_dim=int(dim),
                        logit_scale=float(logit_scale), preprocessing=preprocessing)
    return commit_segments(root, manifest, names, names, options)
