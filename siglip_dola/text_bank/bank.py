"""TextBank, the rows a DoLa scorer ranks ([C, D], L2-normalised), and what makes one sound.

Silent wrong answers are made loud: a bank with one class, or with classes whose embeddings are identical
(typically prompts made only of words the tokenizer does not know, which all encode to the same unknown
tokens), gives a UserWarning naming them: their scores are tied by construction. Such banks are still
returned (warned, not refused), since a tied pair among many classes can be intended.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from siglip_dola.failures import first_few


@dataclass
class TextBank:
    labels: list[str]      # one per row
    embeds: torch.Tensor   # [C, D] fp32, L2-normalised rows
    model_id: str

    def __post_init__(self):
        if self.embeds.ndim != 2 or self.embeds.shape[0] != len(self.labels):
            raise ValueError(f"embeds must be [C, D] with C = len(labels) = {len(self.labels)}; "
                             f"got shape {tuple(self.embeds.shape)}")

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.embeds.shape[1])


def validate_labels(labels: Sequence[str], source: str = "labels") -> list[str]:
    """Labels as a list; ValueError when empty, not strings, blank or duplicated (naming `source`)."""
    if isinstance(labels, str):
        raise TypeError(f"{source} must be a list of strings, not one string")
    labels = list(labels)
    if not labels:
        raise ValueError(f"{source} is empty: give at least one label")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"{source} must be non-blank strings")
    duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicates:
        raise ValueError(f"{source} has duplicate labels: {duplicates}")
    return labels


def warn_indistinct(labels: Sequence[str], embeds: torch.Tensor, source: str, tolerance: float = 1e-6,
                    unreadable_probe: torch.Tensor | None = None) -> None:
    """UserWarning when there is one label, when labels encode like a nonsense word (`unreadable_probe` [D]),
    or when labels' embeddings [C, D] coincide (cosine >= 1 - tolerance); each names the first few labels and
    counts the rest. Memory is O(C): rows are grouped by hashing, never compared all against all."""
    if len(labels) == 1:
        warnings.warn(f"only one class ({labels[0]!r}): it always scores 1.0; ranking needs at least 2 "
                      "candidates", UserWarning, stacklevel=3)
    unit = F.normalize(embeds.double(), dim=-1)  # (C, D)
    unread = set()
    if unreadable_probe is not None:
        probe = F.normalize(unreadable_probe.double(), dim=-1)
        unread = set(torch.nonzero(unit @ probe >= 1.0 - tolerance).flatten().tolist())  # (C,) scores
        if unread:
            warnings.warn(f"{len(unread)} of {len(labels)} classes are not read by the tokenizer of {source} "
                          f"({first_few(labels[i] for i in sorted(unread))}): their prompts encode exactly like a "
                          "nonsense word, so their scores carry no information. Use words the model knows (the "
                          "embedded model reads only its shapes words, e.g. 'red circle') or real weights.",
                          UserWarning, stacklevel=3)
    groups = [g for g in identical_rows(unit, tolerance) if not set(g) <= unread]  # unread ones were named above
    if groups:
        shown = "; ".join(" = ".join(first_few(labels[j] for j in group).split(", ")) for group in groups[:5])
        more = f"; and {len(groups) - 5} more groups" if len(groups) > 5 else ""
        warnings.warn(f"{sum(map(len, groups))} of {len(labels)} classes have identical text embeddings under "
                      f"{source} ({shown}{more}): their scores are tied, so the answer among them is arbitrary. "
                      "Usually every word of those prompts is unknown to the tokenizer; use words the model "
                      "knows (or real weights).", UserWarning, stacklevel=3)


HASH_STEP = 1e-2  # coordinates of a unit row of width D >= 8 differ by far more unless the rows coincide


def identical_rows(unit: torch.Tensor, tolerance: float = 1e-6) -> list[list[int]]:
    """Groups (row indices, in order) of >= 2 unit rows [C, D] that coincide: cosine >= 1 - tolerance.

    Rows are hashed by their cell on a grid of step HASH_STEP, twice (the second grid offset by half a step,
    so rows a float rounding apart rarely straddle an edge of both), and a row joins the first row of its
    cell when their cosine confirms it: O(C * D) memory, not the O(C^2) of a full similarity matrix. Rows
    that coincide (prompts whose words all encode as unknown tokens) differ by float rounding at most and are
    found; distinct rows never share a cell of HASH_STEP in every coordinate.
    """
    parent = list(range(unit.shape[0]))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    weights = np.random.default_rng(0).integers(-2**62, 2**62, size=unit.shape[1], dtype=np.int64)  # (D,)
    values = unit.cpu().double().numpy()  # (C, D)
    for offset in (0.0, 0.5):
        keys = np.empty(len(values), dtype=np.int64)  # (C,) a hash of each row's cell, 4096 rows at a time
        for start in range(0, len(values), 4096):
            cells = np.floor(values[start:start + 4096] / HASH_STEP + offset).astype(np.int64)  # (r, D)
            with np.errstate(over="ignore"):
                keys[start:start + 4096] = cells @ weights  # wrapping int64 arithmetic
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        leader = first[inverse.ravel()]  # (C,) the first row of each row's cell
        cosine = np.einsum("cd,cd->c", values, values[leader])  # (C,)
        for i in np.flatnonzero((leader != np.arange(len(leader))) & (cosine >= 1.0 - tolerance)):
            parent[root(int(i))] = root(int(leader[i]))
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(root(i), []).append(i)
    return [members for members in groups.values() if len(members) > 1]


def check_bank(bank, model) -> None:
    """ValueError unless `bank` (TextBank-like: embeds [C, D], model_id) can score images of `model`.

    The width must match. A model with its own text tower must use a bank it encoded: same width,
    other model gives meaningless scores. A tower without one (Janus) always brings a bank encoded
    elsewhere, so its banks are accepted whatever their model_id.
    """
    model_dim = int(model.readout.embed_dim)
    bank_dim = int(bank.embeds.shape[-1])
    if bank_dim != model_dim:
        raise ValueError(f"text bank dimension {bank_dim} does not match model {model.model_id!r} "
                         f"embedding dimension {model_dim}: build the bank with this model")
    bank_model = getattr(bank, "model_id", None)
    encoders = (model.model_id, getattr(model, "sources", {}).get("text"))   # a borrowed text tower's own banks too
    if bank_model and model.encode_text is not None and bank_model not in encoders:
        raise ValueError(f"bank was encoded by model {bank_model!r}, not by {model.model_id!r}; "
                         "rebuild it with build_text_bank(model, ...)")


def bank_for_classes(bank: TextBank, classnames: Sequence[str], model, source: str = "bank") -> TextBank:
    """`bank` with its rows in the order of `classnames`, checked against `model` (check_bank).

    A bank with the same label set is reordered by label; a bank without stored labels ("0", "1", ...,
    e.g. a .npy) is taken row for row when it has one row per class. Anything else -> ValueError naming `source`.
    """
    check_bank(bank, model)
    classnames = list(classnames)
    if list(bank.labels) == classnames:
        return bank
    if sorted(bank.labels) == sorted(classnames):
        rows = torch.tensor([bank.labels.index(name) for name in classnames])
        return TextBank(labels=classnames, embeds=bank.embeds[rows], model_id=bank.model_id)
    if list(bank.labels) == [str(i) for i in range(len(classnames))]:
        return TextBank(labels=classnames, embeds=bank.embeds, model_id=bank.model_id)
    missing = sorted(set(classnames) - set(bank.labels))[:5]
    raise ValueError(f"{source} has {len(bank.labels)} labels that are not the dataset's {len(classnames)} classes "
                     f"(missing e.g. {missing}); build it from the dataset's class names")
