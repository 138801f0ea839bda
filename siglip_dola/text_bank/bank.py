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

import torch
import torch.nn.functional as F


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
    or when labels' embeddings [C, D] coincide (cosine >= 1 - tolerance); each names the labels."""
    if len(labels) == 1:
        warnings.warn(f"only one class ({labels[0]!r}): it always scores 1.0; ranking needs at least 2 "
                      "candidates", UserWarning, stacklevel=3)
    unit = F.normalize(embeds.double(), dim=-1)
    unread = set()
    if unreadable_probe is not None:
        probe = F.normalize(unreadable_probe.double(), dim=-1)
        unread = set(torch.nonzero(unit @ probe >= 1.0 - tolerance).flatten().tolist())
        if unread:
            names = ", ".join(repr(labels[i]) for i in sorted(unread)[:10])
            warnings.warn(f"{len(unread)} of {len(labels)} classes are not read by the tokenizer of {source} "
                          f"({names}): their prompts encode exactly like a nonsense word, so their scores carry "
                          "no information. Use words the model knows (the embedded model reads only its shapes "
                          "words, e.g. 'red circle') or real weights.", UserWarning, stacklevel=3)
    same = (unit @ unit.T) >= 1.0 - tolerance  # (C, C)
    groups, seen = [], set()
    for i in range(len(labels)):
        if i not in seen:
            members = torch.nonzero(same[i]).flatten().tolist()
            seen.update(members)
            if len(members) > 1 and not set(members) <= unread:  # unread ones were named above
                groups.append([labels[j] for j in members])
    if groups:
        shown = "; ".join(" = ".join(repr(name) for name in group) for group in groups[:10])
        warnings.warn(f"{sum(map(len, groups))} of {len(labels)} classes have identical text embeddings under "
                      f"{source} ({shown}): their scores are tied, so the answer among them is arbitrary. "
                      "Usually every word of those prompts is unknown to the tokenizer; use words the model "
                      "knows (or real weights).", UserWarning, stacklevel=3)


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
