"""The layer store: how each image's [1+J, D] unit vectors (final + stored layers) are kept on disk.

    fp16   2 bytes a dimension (8 KB an image at D=1024, J=3); exact to fp16 rounding
    int8   1 byte a dimension + one float32 scale per vector (max |x| / 127): 4 KB + 16 B an image
    int4   half a byte a dimension (two codes a byte, -7..7) + one float32 scale per vector (max |x| / 7)
    pqM    FAISS product quantiser, M bytes a vector (M sub-quantisers of 256 centroids, D % M == 0),
           trained on a sample of the build's vectors; ``pq`` = pq{D/4}
    A+B    the final row in A, the J layer rows in B (e.g. ``int8+int4``: 1 KB + 3 x 0.5 KB an image). The
           final row ranks the first stage's candidates (its precision is recall and q_N); the layer rows
           only enter log q_M, which tolerates coarser codes (docs/retrieval.md measures both).

A store encodes whole records (one image = its 1+J vectors) into a few ``.npy`` files per segment, and
decodes only the K records a rerank reads. The PQ codec is a FAISS ``index_factory("PQ{M}")`` used
through FAISS's standalone-codec API (``sa_encode`` / ``sa_decode``); it is written once per index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from siglip_dola.dependencies import require

faiss = require("faiss", "retrieval", "image indexes and search")

STORES = ("fp16", "int8", "int4", "pq", "pqM (M bytes a vector)", "FINAL+LAYERS (e.g. int8+int4)")
TRAIN_SAMPLE = 65536  # vectors the PQ codec is trained on (256 centroids x 256 points per sub-quantiser)
FP16_FILE = "vectors.npy"  # also the staged (raw) file of every store: [n, 1+J, D] float16
LEVELS = {"int8": 127, "int4": 7}  # symmetric integer codes -L..L, scale max |x| / L per vector


def _parse_one(spec: str, dim: int, whole: str) -> str:
    if spec in ("fp16", "int8", "int4"):
        if spec == "int4" and dim % 2:
            raise ValueError(f"layer_store {whole!r}: int4 packs two dimensions a byte and needs an even D, not {dim}")
        return spec
    match = re.fullmatch(r"pq(\d*)", spec)
    if match:
        m = int(match.group(1)) if match.group(1) else dim // 4
        if m >= 1 and dim % m == 0:
            return f"pq{m}"
        raise ValueError(f"layer_store {whole!r}: pq needs a byte count M that divides D={dim} (e.g. pq{dim // 4})")
    raise ValueError(f"layer_store must be one of {list(STORES)}, got {whole!r}")


def parse_store(spec: str, dim: int) -> str:
    """The canonical store name ("fp16", "int8", "pq256", "int8+int4"...) or ValueError naming `layer_store`."""
    whole = str(spec).strip().lower()
    parts = [_parse_one(part.strip(), dim, whole) for part in whole.split("+")]
    if len(parts) > 2 or (len(parts) == 2 and sum(p.startswith("pq") for p in parts) > 1):
        raise ValueError(f"layer_store {whole!r}: give one store, or FINAL+LAYERS with at most one pq part "
                         f"(e.g. int8+int4, int8+pq512); valid: {list(STORES)}")
    return parts[0] if len(parts) == 1 or parts[0] == parts[1] else "+".join(parts)


def _files(kind: str, rows: int, dim: int, prefix: str) -> list[tuple[str, np.dtype, tuple]]:
    """The (file, dtype, per-image shape) of `rows` vectors in `kind`; bare names keep older indexes readable."""
    if kind == "fp16":
        return [(f"{prefix}fp16.npy" if prefix else FP16_FILE, np.dtype(np.float16), (rows, dim))]
    if kind in LEVELS:
        width = dim if kind == "int8" else dim // 2
        dtype = np.dtype(np.int8 if kind == "int8" else np.uint8)
        return [(f"{prefix}{kind}.npy", dtype, (rows, width)), (f"{prefix}scales.npy", np.dtype(np.float32), (rows,))]
    return [(f"{prefix}{kind}.npy", np.dtype(np.uint8), (rows, int(kind[2:])))]


def _encode(kind: str, vectors: np.ndarray, codec) -> list[np.ndarray]:
    """[n, R, D] -> the arrays of `_files(kind, R, ...)`."""
    if kind == "fp16":
        return [np.ascontiguousarray(vectors, dtype=np.float16)]
    n, rows, dim = vectors.shape
    if kind in LEVELS:
        vectors = np.asarray(vectors, dtype=np.float32)
        scales = np.abs(vectors).max(axis=-1) / LEVELS[kind]  # (n, R)
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        codes = np.clip(np.rint(vectors / scales[..., None]), -LEVELS[kind], LEVELS[kind]).astype(np.int8)
        if kind == "int4":  # offset to 1..15, two a byte: even dimension in the high nibble
            codes = (codes + 8).astype(np.uint8)
            codes = (codes[..., 0::2] << 4) | codes[..., 1::2]
        return [codes, scales]
    flat = np.ascontiguousarray(vectors.reshape(-1, dim), dtype=np.float32)
    return [codec.sa_encode(flat).reshape(n, rows, -1)]


def _decode(kind: str, arrays: list[np.ndarray], rows: list[int], dim: int, codec) -> np.ndarray:
    """Arrays of K records -> float32 [K, len(rows), D] at `rows` (indexes into this part's rows)."""
    if kind == "fp16":
        return arrays[0][:, rows].astype(np.float32)
    if kind in LEVELS:
        codes, scales = arrays[0][:, rows], arrays[1][:, rows, None]
        if kind == "int4":
            unpacked = np.empty((*codes.shape[:2], dim), dtype=np.int8)
            unpacked[..., 0::2] = (codes >> 4).astype(np.int8) - 8
            unpacked[..., 1::2] = (codes & 15).astype(np.int8) - 8
            codes = unpacked
        return codes.astype(np.float32) * scales
    codes = np.ascontiguousarray(arrays[0][:, rows])
    return codec.sa_decode(codes.reshape(-1, codes.shape[-1])).reshape(len(codes), len(rows), dim)


@dataclass
class LayerStore:
    """One store kind; `codec` is the trained FAISS PQ (stores with a pq part only)."""
    name: str
    rows: int          # 1 + J vectors per image
    dim: int
    codec: object = None

    @property
    def parts(self) -> list[tuple[str, list[int], str]]:
        """[(kind, the record's rows it holds, file prefix)]: one part, or the final row and the layer rows."""
        if "+" not in self.name:
            return [(self.name, list(range(self.rows)), "")]
        final, layers = self.name.split("+")
        return [(final, [0], "final-"), (layers, list(range(1, self.rows)), "layers-")]

    @property
    def files(self) -> list[tuple[str, np.dtype, tuple]]:
        """[(file name, dtype, per-image shape)] of a segment's store files, in checksum order."""
        return [f for kind, rows, prefix in self.parts for f in _files(kind, len(rows), self.dim, prefix)]

    @property
    def code_size(self) -> int:
        """Bytes a vector of the pq part (0 without one)."""
        return next((int(kind[2:]) for kind, _, _ in self.parts if kind.startswith("pq")), 0)

    @property
    def bytes_per_image(self) -> int:
        return sum(dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in self.files)

    @property
    def needs_training(self) -> bool:
        return self.code_size > 0

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
        return [a for kind, rows, _ in self.parts for a in _encode(kind, vectors[:, rows], self.codec)]

    @property
    def final_files(self) -> int:
        """How many of `files` (the first ones) hold the final row: a FINAL+LAYERS store's final part alone."""
        kind, held, prefix = self.parts[0]
        return len(_files(kind, len(held), self.dim, prefix))

    def decode(self, records: list[np.ndarray], rows: list[int]) -> np.ndarray:
        """Arrays of K records (as `encode` gave, first axis K) -> float32 [K, len(rows), D] at `rows`. The arrays
        may stop after the last part `rows` need (the first `final_files` for the final row alone)."""
        out = np.empty((len(records[0]), len(rows), self.dim), dtype=np.float32)
        first = 0
        for kind, held, prefix in self.parts:
            count = len(_files(kind, len(held), self.dim, prefix))
            arrays, first = records[first:first + count], first + count
            wanted = [i for i, row in enumerate(rows) if row in held]
            if wanted:
                out[:, wanted] = _decode(kind, arrays, [held.index(rows[i]) for i in wanted], self.dim, self.codec)
        return out


def store_named(spec: str, rows: int, dim: int) -> LayerStore:
    """The untrained LayerStore for `spec` (ValueError naming `layer_store` when it is not a store)."""
    return LayerStore(parse_store(spec, dim), rows, dim)


def codec_bytes(store: LayerStore) -> bytes:
    """The trained codec serialised by FAISS (pq stores; b"" otherwise)."""
    return b"" if store.codec is None else faiss.serialize_index(store.codec).tobytes()


def load_codec(store: LayerStore, data: bytes) -> None:
    store.codec = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
