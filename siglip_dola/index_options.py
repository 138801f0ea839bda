"""Build-time options of a retrieval index: plain data, importable without FAISS (the `[retrieval]` extra), so the
CLI's parser reads their defaults; `retrieval.commit.check_options` validates them."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LAYER_STORE = "int8+int4"  # from the store comparison in docs/retrieval.md


@dataclass
class StoreOptions:
    """Build-time choices: the layer store, the first stage (factory or memory budget) and its recall target."""
    layer_store: str = DEFAULT_LAYER_STORE
    index_factory: str | None = None
    index_memory: str | int = "4G"
    target_recall: float = 0.95
    rerank_k: int = 100  # k of the recall target
