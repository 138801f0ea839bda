"""Parts taken from another checkpoint: the head (head_from), the text tower (text_from / encode_text), the logit scale.

A vision tower trained without a text tower (Janus, a timm ViT, a SigLIP tower fine-tuned by a user) is scored
against another checkpoint's text tower. Where each part came from goes into ``LoadedModel.sources`` (and from
there into result JSON), because a borrowed part is an assumption the reader must see:

    head        head_from's MAP head, else the model's own
    text        encode_text (a callable), else text_from's text tower, else head_from's, else the model's own
    logit_scale explicit, else the text checkpoint's; a callable or a missing text tower needs an explicit one:
                tau shapes every q_j and the JSD, so a guessed value must never pass silently
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn


HEAD_MARK, TEXT_MARK = "+head:", "+text:"   # a composed model_id: VISION+head:HEAD[+text:TEXT]


def cli_flags(model_id: str) -> str:
    """The CLI flags that load ``model_id`` again: '--model V --head-from H --text-from T' for a composed id."""
    vision, _, text = model_id.partition(TEXT_MARK)
    vision, _, head = vision.partition(HEAD_MARK)
    return " ".join(f"{flag} {value}" for flag, value in
                    (("--model", vision), ("--head-from", head), ("--text-from", text)) if value)


@dataclass(frozen=True)
class Borrowed:
    """One other checkpoint: its module (for the head) and, when loaded whole, its text tower and scale."""

    model_id: str
    module: nn.Module
    loaded: object | None = None     # a LoadedModel (text tower, logit scale / bias); None for a bare module


def resolve(source, name: str, load, device, precision, like: nn.Module) -> Borrowed | None:
    """``source`` (a name or path ``load`` accepts, a LoadedModel or an nn.Module) as a Borrowed; None stays None.

    A checkpoint loaded here by name goes to ``like``'s device and parameter dtype (ours to cast, not the user's)."""
    if source is None:
        return None
    if hasattr(source, "readout") and isinstance(getattr(source, "model", None), nn.Module):   # a LoadedModel
        return Borrowed(source.model_id, source.model, source)
    if isinstance(source, nn.Module):
        return Borrowed(f"{type(source).__name__}", source)
    if isinstance(source, (str, Path)):
        loaded = load(source, device=device, precision=precision)
        param = next(like.parameters(), None)
        if param is not None and param.is_floating_point():
            loaded.model.to(param.dtype)
        return Borrowed(loaded.model_id, loaded.model, loaded)
    raise TypeError(f"{name} must be a model name or path, a LoadedModel or a torch.nn.Module, "
                    f"got {type(source).__name__}")


def finish(loaded, *, head: Borrowed | None, text: Borrowed | None, encode_text, logit_scale, logit_bias,
           wrap_text, fingerprint) -> None:
    """Set ``loaded``'s text encoder, logit scale / bias, model_id and sources from the borrowed parts (in place:
    ``loaded`` is the LoadedModel being built)."""
    vision_id = loaded.model_id
    own_text = loaded.encode_text is not None
    text_id = scale_from = bias_from = vision_id if own_text else None
    if text is not None:
        if text.loaded is None or text.loaded.encode_text is None:
            raise ValueError(f"text_from / head_from {text.model_id!r} has no text tower: pass a SigLIP checkpoint "
                             "by name (or a LoadedModel), or encode_text= and logit_scale=")
        loaded.encode_text = text.loaded.encode_text
        loaded.logit_scale, loaded.logit_bias = text.loaded.logit_scale, text.loaded.logit_bias
        text_id = scale_from = bias_from = text.model_id
    if encode_text is not None:
        if not callable(encode_text):
            raise TypeError(f"encode_text must be a callable list[str] -> [C, D] tensor, got {type(encode_text).__name__}")
        loaded.encode_text = wrap_text(encode_text)
        label = getattr(encode_text, "__qualname__", type(encode_text).__name__)
        text_id, scale_from, bias_from = f"encode_text ({label})", None, None
    if logit_scale is not None:
        loaded.logit_scale, scale_from = float(logit_scale), "explicit"
    elif scale_from is None:
        where = "encode_text is a bare callable" if encode_text is not None else f"{vision_id} has no text tower"
        raise ValueError(f"logit_scale is needed: {where}, so nothing stores the temperature its text embeddings "
                         "were trained with; pass logit_scale (log space: exp(logit_scale) = 1/tau, about 4.7 for "
                         "SigLIP) or the checkpoint the text comes from as text_from / head_from")
    if logit_bias is not None:
        loaded.logit_bias, bias_from = float(logit_bias), "explicit"
    elif bias_from is None:
        loaded.logit_bias, bias_from = 0.0, "none (0.0; the softmax does not use it)"
    loaded.sources = {"vision": vision_id, "head": head.model_id if head is not None else vision_id,
                      "text": text_id, "logit_scale": scale_from, "logit_bias": bias_from}
    if head is not None:
        loaded.model_id = f"{vision_id}{HEAD_MARK}{head.model_id}"
    if text_id not in (None, vision_id, head.model_id if head is not None else None):
        loaded.model_id += f"{TEXT_MARK}{text_id}"
    borrowed_parts = [part for part in (head, text) if part is not None]
    if borrowed_parts:   # the weights identity (bank caches, index manifests) covers every part; fingerprint(Borrowed)
        every = "|".join([loaded.weights_fingerprint, *(fingerprint(part) for part in borrowed_parts)])
        loaded.fingerprint = hashlib.sha256(every.encode()).hexdigest()[:16]
