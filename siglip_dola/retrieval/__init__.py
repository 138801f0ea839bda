"""Retrieval: a persisted image index (FAISS + per-layer embeddings + manifest), first-stage search, DoLa rerank.

    from siglip_dola.retrieval import build_index, add_to_index, open_index, verify_index, search, search_captions
"""
from siglip_dola.retrieval.captions import read_captions, search_captions
from siglip_dola.retrieval.index import add_to_index, build_index
from siglip_dola.retrieval.opened import RetrievalIndex, open_index, verify_index
from siglip_dola.retrieval.storage import IndexCorruptError
from siglip_dola.retrieval.search import RerankConfig, SearchHit, SearchResult, search, search_embedding

__all__ = ["IndexCorruptError", "RetrievalIndex", "RerankConfig", "SearchHit", "SearchResult", "add_to_index", "build_index",
           "open_index", "read_captions", "search", "search_captions", "search_embedding",
           "verify_index"]
