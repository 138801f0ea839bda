"""DeepSeek Janus: DoLa zero-shot scoring of Janus's vision tower, read through a SigLIP checkpoint's head and text.

Janus's understanding encoder is SigLIP-L/16-384 without a usable head: transformers' ``JanusVisionModel`` has
none (the conversion dropped it), and the original repository's ``attn_pool`` is never called
(``ignore_head=True``), so its checkpoints may hold it at any values. ``siglip=`` names the SigLIP checkpoint
whose MAP head reads Janus's layers (layer j = head(post_layernorm(h_j)), Janus's own post_layernorm:
readout/borrowed_head.py) and whose text tower and logit scale score them. Janus reportedly fine-tunes that
encoder in its last training stage: whether SigLIP's text tower still reads it zero-shot is what this measures.
Nothing here imports Janus or changes the model.

    janus = JanusDoLa(vlm, siglip="google/siglip-large-patch16-384")   # or "ViT-L-16-SigLIP-384:webli", a LoadedModel
    janus.classify(pixel_values, ["a cat", "a dog"], top_k=5)   # pixel_values [B, 3, H, W] as Janus's processor makes them

Without ``siglip``, the tower's own ``attn_pool`` is used (refused when it is at its initial values), with a
precomputed bank and ``tau`` (1 / exp(logit_scale) of the SigLIP checkpoint the bank was encoded with).
"""
from __future__ import annotations

import math

import torch

from siglip_dola.scoring import DoLaResult
from siglip_dola.scoring.checks import check_tau
from siglip_dola.scorer import DoLaSigLIP
from siglip_dola.scorer_inputs import bank_rows
from siglip_dola.modes import BASELINE


def _loaded_model(vlm, tau: float | None, siglip):
    """A LoadedModel view of a Janus model (or its vision_model / tower), with siglip's head, text and scale."""
    from siglip_dola.loading import from_model

    try:
        return from_model(vlm, model_id=f"janus:{type(vlm).__name__}", head_from=siglip,
                          logit_scale=None if tau is None else math.log(1.0 / tau))
    except ValueError as error:   # the library names head_from; here the parameter is siglip
        raise ValueError(str(error).replace("head_from", "siglip=")) from None


def _check_tau(tau, siglip) -> float | None:
    if tau is None and siglip is not None:
        return None   # the SigLIP checkpoint's own logit scale
    try:
        return check_tau(tau)
    except (TypeError, ValueError) as error:   # the one check, plus where a Janus user finds tau
        raise ValueError(f"{error}: pass siglip= (the SigLIP checkpoint: its head, text tower and logit scale), "
                         "or 1 / exp(logit_scale) of the SigLIP checkpoint the text bank was encoded with") from None


class JanusDoLa:
    """Score Janus images against class names or a text bank; `use_dola_siglip=False` gives the plain SigLIP baseline.

    ``bank``: class names (encoded by siglip's text tower), a TextBank or [C, D] tensor; here or per call."""

    def __init__(self, vlm, bank=None, *, siglip=None, tau: float | None = None, use_dola_siglip: bool = True,
                 mode: str | None = None, alpha: float | None = None, layers=None, bucket=None,
                 n_buckets: int | None = None, static_layer=None, batch_size: int = 32,
                 contrast_weight: float | None = None, calibration=None):
        if not isinstance(use_dola_siglip, bool):
            raise TypeError(f"use_dola_siglip must be True or False, got {use_dola_siglip!r}")
        self.use_dola_siglip = use_dola_siglip
        self.model = _loaded_model(vlm, _check_tau(tau, siglip), siglip)
        if use_dola_siglip:
            self.scorer = DoLaSigLIP(self.model, mode=mode, alpha=alpha, layers=layers, bucket=bucket,
                                     n_buckets=n_buckets, static_layer=static_layer, batch_size=batch_size,
                                     contrast_weight=contrast_weight, calibration=calibration)
        else:  # baseline: no early layer is read at all
            self.scorer = DoLaSigLIP(self.model, mode=BASELINE, alpha=alpha, batch_size=batch_size)
        self.bank = bank
        if bank is not None:
            _, self._embeds = bank_rows(bank, self.model)  # validates the bank's dimension against the tower

    def _bank(self, bank):
        if bank is None and self.bank is None:
            raise ValueError("bank is needed: class names, a TextBank or a [C, D] tensor, here or in JanusDoLa(...)")
        return self.bank if bank is None else bank

    def scores(self, pixel_values: torch.Tensor, bank=None) -> DoLaResult:
        """DoLaResult for pixel_values [B, 3, H, W]: probs [B, C] (q_N when the switch is off), premature_layer [B]."""
        embeds = self._embeds if bank is None and self.bank is not None else bank_rows(self._bank(bank), self.model)[1]
        return self.scorer.score_pixels(pixel_values, embeds)

    def classify(self, pixel_values: torch.Tensor, bank=None, top_k: int = 5) -> list[dict]:
        """Per image {image, predictions [{label, score, baseline_score}], premature_layer, jsd} (see DoLaSigLIP.classify)."""
        return self.scorer.classify(pixel_values, self._bank(bank), top_k=top_k)


def score_images(vlm, pixel_values: torch.Tensor, bank, *, siglip=None, tau: float | None = None,
                 use_dola_siglip: bool = True, **options) -> DoLaResult:
    """One-call form: DoLaResult (probs [B, C], final_probs [B, C], premature_layer [B], jsd [J, B])."""
    return JanusDoLa(vlm, bank, siglip=siglip, tau=tau, use_dola_siglip=use_dola_siglip, **options).scores(pixel_values)
