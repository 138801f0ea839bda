"""An opened retrieval index (``open_index``), its integrity checks (``verify_index``) and the weights identity.

    open_index(index, model=None, layers=None, verify=False, image_root=None) -> RetrievalIndex
    verify_index(index) -> Manifest        # full check: re-hash every file
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siglip_dola.retrieval import faiss_store, mapped, row_checks, segment, storage
from siglip_dola.retrieval.segment import store_of
from siglip_dola.retrieval.layer_store import LayerStore
from siglip_dola.retrieval.storage import Manifest


def weights_fingerprint(model) -> str:
    """Content hash of a LoadedModel's weights: every state tensor's name, shape, dtype and a strided
    sample of its values (exact values, so the same on CPU and GPU); "" for a model without a module.

    Identifies the weights however they were named: "embedded" and the path of the embedded folder, or
    a copied checkpoint, give the same fingerprint.
    """
    module = getattr(model, "model", None)
    if module is None:
        return ""
    cached = getattr(model, "_content_fingerprint", None)
    if cached is None:
        digest = hashlib.sha256()
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().reshape(-1)
                sample = flat[::max(1, flat.numel() // 4096)].to("cpu", torch.float64)
                digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(sample.numpy().tobytes())
        cached = digest.hexdigest()[:16]
        model._content_fingerprint = cached
    return cached


def check_compatible(manifest: Manifest, model, layers=None, root="") -> None:
    """ValueError when the index was built with other weights, or lacks requested layers.

    model: a LoadedModel (compared by weights fingerprint when both sides have one, else by id), a
    model id string, or None (no check).
    """
    model_id = model if isinstance(model, str) or model is None else model.model_id
    fingerprint = "" if isinstance(model, str) or model is None else weights_fingerprint(model)
    same = (fingerprint == manifest.weights_fingerprint if fingerprint and manifest.weights_fingerprint
            else model_id is None or model_id == manifest.model_id)
    if not same:
        raise ValueError(f"index {str(root)!r} was built with model {manifest.model_id!r} (weights "
                         f"{manifest.weights_fingerprint or '?'}), not {model_id!r} (weights {fingerprint or '?'}); "
                         f"pass model={manifest.model_id!r} or rebuild the index with the new model")
    if layers is not None:
        missing = [j for j in layers if j not in manifest.layers]
        if missing:
            raise ValueError(f"index {str(root)!r} stores layers {manifest.layers}; layers {missing} were "
                             f"requested (valid: any of {manifest.layers}; rebuild it with layers= that store others)")


def absolute_paths(paths: list[str], image_root: str) -> list[str]:
    """Stored paths -> absolute paths under `image_root` (format 1 paths are absolute already)."""
    return [os.path.normpath(os.path.join(image_root, p)) if image_root else p for p in paths]


@dataclass
class RetrievalIndex:
    """An opened index: FAISS over final embeddings, memory-mapped layer vectors, paths by id."""
    root: Path
    manifest: Manifest
    faiss_index: object
    paths: list[str]
    offsets: np.ndarray            # [S + 1] first id of each segment, then the count
    segment_arrays: list           # per segment: the layer store's memory-mapped arrays, first axis n_s
    store: LayerStore = None
    checksums: list = None         # per segment: uint64 [n_s] record checksums, or None (built before format 3)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def tau(self) -> float:
        """Temperature of the model the index was built with: 1 / exp(logit_scale)."""
        return float(np.exp(-self.manifest.logit_scale))

    def __len__(self) -> int:
        return self.manifest.count

    def _by_segment(self, ids: np.ndarray, files: int | None = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """[(segment, positions in `ids`, its rows there)], rows ascending; the pages of every segment's rows (in
        its first `files` store files) are requested at once, before any is read, so the disk serves them together."""
        segment_of = np.searchsorted(self.offsets, ids, side="right") - 1  # (K,)
        groups = []
        for seg in np.unique(segment_of):
            where = np.nonzero(segment_of == seg)[0]
            order = np.argsort(ids[where])  # ascending reads from the memory map
            groups.append((int(seg), where[order], ids[where[order]] - self.offsets[seg]))
        for seg, _, local in groups:
            mapped.prefetch(self.segment_arrays[seg][:files], local)
        return groups

    def vectors(self, ids: np.ndarray, rows: list[int]) -> np.ndarray:
        """Stored vectors of `ids` [K] at `rows` (0 = final, 1+j = layers[j]) -> float32 [len(rows), K, D].

        Reads and decodes only the K records, and checks each against its stored checksum first:
        IndexCorruptError naming the segment file, the row and the image when one differs.
        """
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), len(rows), self.manifest.embed_dim), dtype=np.float32)  # (K, R, D)
        for seg, where, local in self._by_segment(ids):
            records = [np.asarray(array[local]) for array in self.segment_arrays[seg]]  # each (k, ...)
            if self.checksums is not None and self.checksums[seg] is not None:
                self._check(seg, records, local)
            out[where] = self.store.decode(records, rows)  # (k, R, D)
        return out.transpose(1, 0, 2)  # (R, K, D) view

    def final_rows(self, ids: np.ndarray) -> np.ndarray:
        """Final rows of `ids` [K'] -> float32 [K', D], reading only the files that hold them (a FINAL+LAYERS
        store's final part), unchecked: they only choose which K candidates `vectors` then reads and checks
        whole, as the FAISS lists only propose candidates. A refine over a store larger than RAM thus reads
        1 KB a candidate (int8 final row), not the record's 2.6 KB, and keeps only those pages cached."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.manifest.embed_dim), dtype=np.float32)
        files = self.store.final_files
        for seg, where, local in self._by_segment(ids, files):
            records = [np.asarray(array[local]) for array in self.segment_arrays[seg][:files]]
            out[where] = self.store.decode(records, [0])[:, 0]
        return out

    def _check(self, seg: int, records: list[np.ndarray], local: np.ndarray) -> None:
        bad = row_checks.bad_records(records, self.checksums[seg][local])
        if len(bad):
            name = self.manifest.segments[seg]["name"]
            row = int(local[bad[0]])
            image = self.paths[int(self.offsets[seg]) + row]
            raise storage.IndexCorruptError(
                self.root, f"{storage.SEGMENTS}/{name}/{self.store.files[0][0]}",
                f"row {row} (image {image!r}) does not match its {row_checks.ALGORITHM} checksum"
                + (f", and {len(bad) - 1} more of the rows read" if len(bad) > 1 else ""))


def check_relocatable(manifest: Manifest, root) -> None:
    if not manifest.image_root:
        raise ValueError(f"index {str(root)!r} (format 1) stores absolute image paths and cannot be relocated "
                         "with image_root; rebuild it to store relative paths")


def _image_root(manifest: Manifest, root: Path, image_root) -> str:
    """The folder the stored paths are relative to: `image_root` if given, else the recorded one."""
    if image_root is not None:
        check_relocatable(manifest, root)
        folder = Path(image_root).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"image_root={str(image_root)!r} is not a folder")
        return str(folder)
    if manifest.image_root and not Path(manifest.image_root).is_dir():
        warnings.warn(f"index {str(root)!r}: its images were under {manifest.image_root}, which no longer "
                      "exists; pass image_root=NEW_FOLDER if they moved", stacklevel=3)
    return manifest.image_root


def open_index(index, model=None, layers=None, verify: bool = False, image_root=None) -> RetrievalIndex:
    """Open the index at `index`; `model` (LoadedModel or model id) and `layers` are checked against it.

    Every open checks segment sizes, shapes and path counts, and the FAISS files' sizes and the block checksums of
    what FAISS reads into RAM (IndexCorruptError, a ValueError naming the file). verify=True also re-hashes every
    vectors file and every block of the memory-mapped inverted lists (reads the whole index).
    image_root: where the images are now, if their folder moved since the build (paths are relative to it).
    """
    root = Path(index)
    manifest = storage.read_manifest(root)
    check_compatible(manifest, model, layers, root)
    folder_of_images = _image_root(manifest, root, image_root)
    store = store_of(root, manifest)
    paths, arrays, checksums = [], [], []
    for seg in manifest.segments:
        folder = root / storage.SEGMENTS / seg["name"]
        if verify:
            segment.verify_segment(root, folder, store, seg["sha256"])
        segment_arrays, meta, digests = segment.check_segment(root, folder, seg, store)
        arrays.append(segment_arrays)
        checksums.append(digests)
        paths.extend(absolute_paths(meta["paths"], folder_of_images))
    if sum(seg["count"] for seg in manifest.segments) != manifest.count:
        raise storage.IndexCorruptError(root, storage.MANIFEST, "segment counts do not add up to its count")
    unchecked = sum(seg["count"] for seg, digests in zip(manifest.segments, checksums) if digests is None)
    if unchecked and not verify:
        warnings.warn(f"index {str(root)!r}: {unchecked} of its {manifest.count} images were indexed before row "
                      "checksums (format < 3), so a search cannot detect a corrupted row among them; check them with "
                      "`siglip-dola index verify`, or rebuild the index to add checksums", UserWarning, stacklevel=2)
    counts = [seg["count"] for seg in manifest.segments]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    first = faiss_store.read(root, manifest, verify=verify)
    return RetrievalIndex(root, manifest, first, paths, offsets, arrays, store, checksums)


def verify_index(index) -> Manifest:
    """Full integrity check: every segment's sha256, size, shape and meta, and every block of the FAISS files.

    Returns the manifest; raises IndexCorruptError (a ValueError) naming the first broken file.
    """
    return open_index(index, verify=True).manifest
