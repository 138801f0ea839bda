"""Text banks on disk: .safetensors (embeds + labels/model_id metadata) or .npy (embeds only), and label files.

Nothing is unpickled (np.load(allow_pickle=False), safetensors); writes are atomic; rows are L2-normalised
on load and checked (finite, non-zero, distinct: text_bank.bank.warn_indistinct).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from siglip_dola.io import atomic_path
from siglip_dola.text_bank.bank import TextBank, validate_labels, warn_indistinct

BANK_FORMAT = "siglip-dola-text-bank/1"


def read_labels_file(path: str | Path) -> list[str]:
    """Labels from a UTF-8 text file, one per line; surrounding whitespace and blank lines are ignored."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"labels file {path} is not valid UTF-8 ({error.reason} at byte {error.start}); "
                         "save it as UTF-8 with one label per line") from error
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    return validate_labels(labels, source=f"labels file {path}")


def save_text_bank(bank: TextBank, path: str | Path) -> None:
    """Write `bank` atomically as .safetensors (embeds + labels/model_id metadata) or .npy (embeds only)."""
    path = Path(path)
    embeds = bank.embeds.detach().float().cpu().contiguous()
    with atomic_path(path) as tmp:
        if path.suffix == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, embeds.numpy(), allow_pickle=False)
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"format": BANK_FORMAT, "labels": json.dumps(bank.labels), "model_id": bank.model_id}
            save_file({"embeds": embeds}, str(tmp), metadata=metadata)
        else:
            raise ValueError(f"text bank path must end with .safetensors or .npy; got {path}")


def load_text_bank(path: str | Path, labels: Sequence[str] | str | Path | None = None,
                   model_id: str | None = None, rows_in_class_order: bool = False) -> TextBank:
    """Bank from .npy (allow_pickle=False) or .safetensors; rows are L2-normalised on load.

    `labels`: a list, or a path to a labels file; None -> the labels stored in the .safetensors
    metadata, else "0", "1", ... (with a warning, unless `rows_in_class_order`: the caller matches rows to a
    dataset's classes). A .safetensors bank holds its embeds under "embeds" (or its only tensor).
    """
    path = Path(path)
    embeds, stored_labels, stored_model_id = _read_bank_file(path)
    if isinstance(labels, (str, Path)):
        labels = read_labels_file(labels)
    if embeds.ndim != 2:
        raise ValueError(f"bank {path} has shape {tuple(embeds.shape)}; expected [C, D]")
    if labels is None:
        if stored_labels is None and not rows_in_class_order:
            warnings.warn(f"bank {path} stores no labels: its classes are named '0'..'{embeds.shape[0] - 1}'; "
                          "give the class names (labels=NAMES)", UserWarning, stacklevel=2)
        labels = stored_labels if stored_labels is not None else [str(i) for i in range(embeds.shape[0])]
    labels = validate_labels(labels, source="labels")
    if embeds.shape[0] != len(labels):
        raise ValueError(f"bank {path} has shape {tuple(embeds.shape)}; expected [C, D] with C = "
                         f"{len(labels)} labels")
    embeds = embeds.float()
    if not torch.isfinite(embeds).all() or (embeds.norm(dim=-1) == 0).any():
        bad = sorted(set(torch.nonzero(~torch.isfinite(embeds).all(-1) | (embeds.norm(dim=-1) == 0)).flatten().tolist()))
        raise ValueError(f"bank {path}: rows {bad[:10]} are NaN, infinite or all zero; rebuild the bank")
    embeds = F.normalize(embeds, dim=-1)
    warn_indistinct(labels, embeds, f"bank {path}")
    return TextBank(labels=labels, embeds=embeds, model_id=model_id or stored_model_id or "")


def _read_bank_file(path: Path):
    """(embeds tensor, stored labels or None, stored model_id or None)."""
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:  # object arrays, truncated or not .npy at all
            raise ValueError(f"bank {path} cannot be read as a numeric .npy array ({err}); "
                             "save it with np.save(path, embeds.astype(np.float32))") from None
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"bank {path} has dtype {array.dtype}; expected floating point embeddings")
        return torch.from_numpy(np.ascontiguousarray(array)), None, None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
                key = "embeds" if "embeds" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"bank {path} must hold an 'embeds' tensor or exactly one tensor; has {keys}")
                metadata = handle.metadata() or {}
                labels = json.loads(metadata["labels"]) if "labels" in metadata else None
                return handle.get_tensor(key), labels, metadata.get("model_id")
        except ValueError:
            raise
        except Exception as err:  # safetensors' SafetensorError: truncated / not a safetensors file
            raise ValueError(f"bank {path} cannot be read as .safetensors ({type(err).__name__}: {err})") from None
    raise ValueError(f"text bank path must end with .safetensors or .npy; got {path}")
