"""build_text_bank: class names x prompt templates ensembled as open_clip does, cached by content.

Ensembling (open_clip's `build_zero_shot_classifier`): every (class, template) text is encoded and
L2-normalised, the per-class mean over templates is taken and L2-normalised again. A template must hold
exactly one ``{}`` (else ValueError). The cache file is named by a sha256 over model, weights, classes
and templates, so any change builds a new bank.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from siglip_dola.text_bank.bank import TextBank, validate_labels, warn_indistinct
from siglip_dola.text_bank.files import BANK_FORMAT, load_text_bank, save_text_bank

# A word no vocabulary holds: a word-level tokenizer maps it to its unknown token, a BPE one to pieces.
# A class whose prompts encode exactly like this word's was not read by the tokenizer.
UNREADABLE_PROBE = "qzxjvkwq"
Template = str | Callable[[str], str]


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names shipped with open_clip."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompt templates as format strings ('a photo of a {}.')."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [_template_string(template) for template in OPENAI_IMAGENET_TEMPLATES]


def build_text_bank(model, classnames: Sequence[str], templates: Sequence[Template] = ("{}",),
                    cache_dir: str | Path | None = None, batch_size: int = 256, progress: bool = True) -> TextBank:
    """Encode classnames x templates with `model` (a LoadedModel) -> TextBank [C, D]; cached when cache_dir is set.
    A progress bar (stderr) shows when the prompts are more than one batch and `progress` is on."""
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
    embeds = _encode_ensembled(model, [*classnames, UNREADABLE_PROBE], templates, batch_size, progress)
    embeds, probe = embeds[:-1], embeds[-1]
    warn_indistinct(classnames, embeds, f"model {model.model_id!r}", unreadable_probe=probe)
    bank = TextBank(labels=classnames, embeds=embeds, model_id=model.model_id)
    if cache_path is not None:
        save_text_bank(bank, cache_path)
    return bank


def _encode_ensembled(model, classnames, templates, batch_size, progress: bool = True) -> torch.Tensor:
    from siglip_dola.embedding.texts import embed_texts

    texts = [_apply(template, name) for name in classnames for template in templates]  # class-major
    text_embeds = F.normalize(embed_texts(model, texts, batch_size, "text banks", progress), dim=-1)  # (C * T, D)
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
