"""Text banks: class names x prompt templates ensembled as open_clip does, label files, .npy/.safetensors, cache.

Ensembling (open_clip's `build_zero_shot_classifier`): every (class, template) text is encoded and
L2-normalised, the per-class mean over templates is taken and L2-normalised again.

Silent wrong answers are made loud: a template must hold exactly one ``{}`` (else ValueError); a bank
with one class, or with classes whose embeddings are identical (typically prompts made only of words
the tokenizer does not know, which all encode to the same unknown tokens), gives a UserWarning naming
them: their scores are tied by construction. Such banks are still returned (warned, not refused),
since a tied pair among many classes can be intended.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from siglip_dola.io import atomic_path

BANK_FORMAT = "siglip-dola-text-bank/1"
# A word no vocabulary holds: a word-level tokenizer maps it to its unknown token, a BPE one to pieces.
# A class whose prompts encode exactly like this word's was not read by the tokenizer.
UNREADABLE_PROBE = "qzxjvkwq"
Template = str | Callable[[str], str]


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


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names shipped with open_clip."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompt templates as format strings ('a photo of a {}.')."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [_template_string(template) for template in OPENAI_IMAGENET_TEMPLATES]


def build_text_bank(model, classnames: Sequence[str], templates: Sequence[Template] = ("{}",),
                    cache_dir: str | Path | None = None, batch_size: int = 256) -> TextBank:
    """Encode classnames x templates with `model` (a LoadedModel) -> TextBank [C, D]; cached when cache_dir is set."""
    classnames = validate_labels(classnames, source="classnames")
    templates = _validate_templates(templates)
    if model.encode_text is None:
        raise ValueError(f"model {model.model_id!r} has no text encoder: load a precomputed bank "
                         "with load_text_bank(path, labels)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    cache_path = None
    if cache_dir is not None:
        cache_path = _cache_path(Path(cache_dir), model, classnames, templates)
        if cache_path.is_file():
            return load_text_bank(cache_path)
    # one more "class", a nonsense word: a class that encodes exactly like it was not read at all
    embeds = _encode_ensembled(model, [*classnames, UNREADABLE_PROBE], templates, batch_size)
    embeds, probe = embeds[:-1], embeds[-1]
    warn_indistinct(classnames, embeds, f"model {model.model_id!r}", unreadable_probe=probe)
    bank = TextBank(labels=classnames, embeds=embeds, model_id=model.model_id)
    if cache_path is not None:
        save_text_bank(bank, cache_path)
    return bank


def _encode_ensembled(model, classnames, templates, batch_size) -> torch.Tensor:
    from siglip_dola.evaluation.embed import embed_texts

    texts = [_apply(template, name) for name in classnames for template in templates]  # class-major
    text_embeds = F.normalize(embed_texts(model, texts, batch_size, "text banks"), dim=-1)  # (C * T, D)
    text_embeds = text_embeds.reshape(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(text_embeds.mean(dim=1), dim=-1)                     # (C, D)


def _apply(template: Template, classname: str) -> str:
    return template.format(classname) if isinstance(template, str) else template(classname)


def _template_string(template: Template) -> str:
    return template if isinstance(template, str) else template("{}")


def _validate_templates(templates) -> list[Template]:
    """Templates as a list; ValueError unless each puts the class name into the text exactly once."""
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates or not all(isinstance(t, str) or callable(t) for t in templates):
        raise ValueError("templates must be a non-empty list of format strings ('a photo of a {}.') or callables")
    for template in templates:
        shown = template if isinstance(template, str) else getattr(template, "__name__", repr(template))
        try:
            first, second = _apply(template, "\x00a"), _apply(template, "\x00b")
        except (IndexError, KeyError, ValueError, AttributeError) as err:
            raise ValueError(f"template {shown!r} must hold exactly one {{}} for the class name, e.g. "
                             f"'a photo of a {{}}.' ({type(err).__name__}: {err})") from None
        if not isinstance(first, str) or first == second:
            raise ValueError(f"template {shown!r} does not use the class name: every class would get the same "
                             "text; put {} where the name goes, e.g. 'a photo of a {}.'")
        if first.count("\x00a") != 1:
            raise ValueError(f"template {shown!r} must hold exactly one {{}} for the class name, "
                             f"not {first.count(chr(0) + 'a')}")
    return templates


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
                   model_id: str | None = None) -> TextBank:
    """Bank from .npy (allow_pickle=False) or .safetensors; rows are L2-normalised on load.

    `labels`: a list, or a path to a labels file; None -> the labels stored in the .safetensors
    metadata, else "0", "1", ... . A .safetensors bank holds its embeds under "embeds" (or its only tensor).
    """
    path = Path(path)
    embeds, stored_labels, stored_model_id = _read_bank_file(path)
    if isinstance(labels, (str, Path)):
        labels = read_labels_file(labels)
    if embeds.ndim != 2:
        raise ValueError(f"bank {path} has shape {tuple(embeds.shape)}; expected [C, D]")
    if labels is None:
        if stored_labels is None:
            warnings.warn(f"bank {path} stores no labels: its classes are named '0'..'{embeds.shape[0] - 1}'; "
                          "give the class names with --labels / --labels-file (labels=)", UserWarning, stacklevel=2)
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
    if bank_model and model.encode_text is not None and bank_model != model.model_id:
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


def bank_cache_key(model_id: str, weights_fingerprint: str, classnames: Sequence[str],
                   templates: Sequence[Template]) -> str:
    """sha256 over model id, weights fingerprint, class names and templates (as format strings)."""
    payload = {"format": BANK_FORMAT, "model_id": model_id, "weights": weights_fingerprint,
               "classnames": list(classnames), "templates": [_template_string(t) for t in templates]}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def _cache_path(cache_dir: Path, model, classnames, templates) -> Path:
    key = bank_cache_key(model.model_id, model.weights_fingerprint, classnames, templates)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.model_id)[-60:].strip("_") or "model"
    return cache_dir / f"{slug}-{key[:24]}.safetensors"
