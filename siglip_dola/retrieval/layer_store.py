"""The layer store: how each image's [1+J, D] unit vectors (final + stored layers) are kept on disk.

    fp16   2 bytes a dimension (8 KB an image at D=1024, J=3); exact to fp16 rounding
    int8   1 byte a dimension + one float32 scale per vector (max |x| / 127): 4 KB + 16 B an image
    pqM    FAISS product quantiser, M bytes a vector (M sub-quantisers of 256 centroids, D % M == 0),
           trained on a sample of the build's vectors; ``pq`` = pq{D/4}

A store encodes whole records (one image = its 1+J vectors) into one or two ``.npy`` files per segment,
and decodes only the K records a rerank reads. The PQ codec is a FAISS ``index_factory("PQ{M}")`` used
through FAISS's standalone-codec API (``sa_encode`` / ``sa_decode``); it is written once per index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from siglip_dola.dependencies import require

faiss = require("faiss", "retrieval", "image indexes and search")

STORES = ("fp16", "int8", "pq", "pqM (M bytes a vector)")
TRAIN_SAMPLE = 65536  # vectors the PQ codec is trained on (256 centroids x 256 points per sub-quantiser)
FP16_FILE = "vectors.npy"  # also the staged (raw) file of every store: [n, 1+J, D] float16


def parse_store(spec: str, dim: int) -> str:
    """The canonical store name ("fp16", "int8", "pq256"...) or ValueError naming `layer_store`."""
    spec = str(spec).strip().lower()
    if spec in ("fp16", "int8"):
        return spec
    match = re.fullmatch(r"pq(\d*)", spec)
    if match:
        m = int(match.group(1)) if match.group(1) else dim // 4
        if m >= 1 and dim % m == 0:
            return f"pq{m}"
        raise ValueError(f"layer_store {spec!r}: pq needs a byte count M that divides D={dim} (e.g. pq{dim // 4})")
    raise ValueError(f"layer_store must be one of {list(STORES)}, got {spec!r}")


@dataclass
class LayerStore:
    """One store kind; `codec` is the trained FAISS PQ (pq stores only)."""
    name: str
    rows: int          # 1 + J vectors per image
    dim: int
    codec: object = None

    @property
    def files(self) -> list[tuple[str, np.dtype, tuple]]:
        """[(file name, dtype, per-image shape)] of a segment's store files, in checksum order."""
        if self.name == "fp16":
            return [(FP16_FILE, np.dtype(np.float16), (self.rows, self.dim))]
        if self.name == "int8":
            return [("int8.npy", np.dtype(np.int8), (self.rows, self.dim)),
                    ("scales.npy", np.dtype(np.float32), (self.rows,))]
        return [(f"{self.name}.npy", np.dtype(np.uint8), (self.rows, self.code_size))]

    @property
    def code_size(self) -> int:
        return int(self.name[2:]) if self.name.startswith("pq") else 0

    @property
    def bytes_per_image(self) -> int:
        return sum(dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in self.files)

    @property
    def needs_training(self) -> bool:
        return self.name.startswith("pq")

    def train(self, sample: np.ndarray) -> None:
        """Train the PQ codec on `sample` [m, D] float32 (vectors of any rows)."""
        if len(sample) < 256:  # 256 centroids per sub-quantiser
            raise ValueError(f"layer_store {self.name!r} needs at least 256 vectors to train its codec, the gallery "
                             f"gives {len(sample)} (images x {self.rows} rows); use layer_store 'int8' or 'fp16'")
        codec = faiss.index_factory(self.dim, f"PQ{self.code_size}np")  # np: no polysemous training
        codec.train(np.ascontiguousarray(sample, dtype=np.float32))
        self.codec = codec

    def encode(self, vectors: np.ndarray) -> list[np.ndarray]:
        """[n, 1+J, D] unit vectors -> the arrays of `files` (first axis n)."""
        n = vectors.shape[0]
        if self.name == "fp16":
            return [np.ascontiguousarray(vectors, dtype=np.float16)]
        if self.name == "int8":
            vectors = np.asarray(vectors, dtype=np.float32)
            scales = np.abs(vectors).max(axis=-1) / 127.0  # (n, R)
            scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
            codes = np.clip(np.rint(vectors / scales[..., None]), -127, 127).astype(np.int8)
            return [codes, scales]
        flat = np.ascontiguousarray(vectors.reshape(-1, self.dim), dtype=np.float32)
        return [self.codec.sa_encode(flat).reshape(n, self.rows, self.code_size)]

    def decode(self, records: list[np.ndarray], rows: list[int]) -> np.ndarray:
        """Arrays of K records (as `encode` gave, first axis K) -> float32 [K, len(rows), D] at `rows`."""
        if self.name == "fp16":
            return records[0][:, rows].astype(np.float32)
        if self.name == "int8":
            codes, scales = records
            return codes[:, rows].astype(np.float32) * scales[:, rows, None]
        codes = np.ascontiguousarray(records[0][:, rows]).reshape(-1, self.code_size)
        return self.codec.sa_decode(codes).reshape(len(records[0]), len(rows), self.dim)


def codec_bytes(store: LayerStore) -> bytes:
    """The trained codec serialised by FAISS (pq stores; b"" otherwise)."""
    return b"" if store.codec is None else faiss.serialize_index(store.codec).tobytes()


def load_codec(store: LayerStore, data: bytes) -> None:
    store.codec = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
