"""A `use_dola_siglip=True` switch for DeepSeek Janus: DoLa zero-shot scoring through Janus's own SigLIP tower.

Janus (``MultiModalityCausalLM``) holds its SigLIP ViT at ``vlm.vision_model.vision_tower`` (a timm-style
``VisionTransformer`` with ``get_intermediate_layers`` / ``forward_head``), with an optional
``vision_model.image_norm``. ``siglip_dola.readout.from_model`` reads the final and early layers through
that tower's own final norm + MAP head. Janus has no text tower, so the text bank is precomputed
(e.g. with the SigLIP text tower the ViT came from, ``siglip_dola.load_text_bank``) and ``tau`` must be
given: ``1 / exp(logit_scale)`` of that SigLIP checkpoint. Nothing here imports Janus or changes the model.

    janus = JanusDoLa(vlm, bank, tau=1 / 117.3, use_dola_siglip=True)   # use_dola_siglip=False: baseline
    janus.classify(pixel_values, top_k=5)        # pixel_values [B, 3, H, W] as Janus's processor makes them
"""
from __future__ import annotations

import math

import torch

from siglip_dola.scoring import DoLaResult
from siglip_dola.scoring.checks import check_tau
from siglip_dola.scorer import DoLaSigLIP
from siglip_dola.scorer_inputs import bank_rows


def _loaded_model(vlm, tau: float):
    """A LoadedModel view of a Janus model (or its vision_model / tower): readout only, no text tower."""
    from siglip_dola.loading import from_model

    return from_model(vlm, model_id=f"janus:{type(vlm).__name__}", logit_scale=math.log(1.0 / tau))


def _check_tau(tau) -> float:
    try:
        return check_tau(tau)
    except (TypeError, ValueError) as error:   # the one check, plus where a Janus user finds tau
        raise ValueError(f"{error}: Janus has no logit_scale, pass 1 / exp(logit_scale) of the SigLIP checkpoint "
                         "the text bank was encoded with") from None


class JanusDoLa:
    """Score Janus images against a precomputed text bank; `use_dola_siglip=False` gives the plain SigLIP baseline."""

    def __init__(self, vlm, bank, *, tau: float, use_dola_siglip: bool = True, mode: str | None = None,
                 alpha: float | None = None, layers=None, bucket=None, n_buckets: int | None = None, static_layer=None,
                 batch_size: int = 32, contrast_weight: float | None = None, calibration=None):
        if not isinstance(use_dola_siglip, bool):
            raise TypeError(f"use_dola_siglip must be True or False, got {use_dola_siglip!r}")
        self.use_dola_siglip = use_dola_siglip
        self.bank = bank
        model = _loaded_model(vlm, _check_tau(tau))
        if use_dola_siglip:
            self.scorer = DoLaSigLIP(model, mode=mode, alpha=alpha, layers=layers, bucket=bucket,
                                     n_buckets=n_buckets, static_layer=static_layer, batch_size=batch_size,
                                     contrast_weight=contrast_weight, calibration=calibration)
        else:  # baseline: no early layer is read at all
            self.scorer = DoLaSigLIP(model, mode="off", alpha=alpha, batch_size=batch_size)
        _, self._embeds = bank_rows(bank, model)  # validates the bank's dimension against the tower

    def scores(self, pixel_values: torch.Tensor) -> DoLaResult:
        """DoLaResult for pixel_values [B, 3, H, W]: probs [B, C] (q_N when the switch is off), premature_layer [B]."""
        return self.scorer.score_pixels(pixel_values, self._embeds)

    def classify(self, pixel_values: torch.Tensor, top_k: int = 5) -> list[dict]:
        """Per image {image, predictions [{label, score, baseline_score}], premature_layer, jsd} (see DoLaSigLIP.classify)."""
        return self.scorer.classify(pixel_values, self.bank, top_k=top_k)


def score_images(vlm, pixel_values: torch.Tensor, bank, *, tau: float, use_dola_siglip: bool = True,
                 **options) -> DoLaResult:
    """One-call form: DoLaResult (probs [B, C], final_probs [B, C], premature_layer [B], jsd [J, B])."""
    return JanusDoLa(vlm, bank, tau=tau, use_dola_siglip=use_dola_siglip, **options).scores(pixel_values)
