"""DoLaSigLIP: zero-shot classification and reranking with DoLa on a loaded SigLIP model.

Per batch the core is the two-line composition (ONE backbone forward):
    z_final, z_layers = model.readout(pixels, layers)
    result = scoring.score(z_final, z_layers, bank.embeds, tau, settings)   # settings: a DoLaSettings

Settings (mode, layers, alpha, contrast weight) come from ``siglip_dola.settings.resolve_settings``:
explicit arguments > a calibration (a ``siglip-dola calibrate`` JSON, or "embedded"; default: the
LoadedModel's own, the shipped one for the embedded model) > the design note's defaults (dynamic, the
last of 3 buckets' even layers, alpha 0.1, lambda 1). ``scorer.settings`` records each value's source.
What the methods accept (images, banks, texts, precomputed embeddings) is checked and converted in scorer_inputs.py.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterable, Iterator

import torch

from siglip_dola import scoring
from siglip_dola.data.gpu_decode import check_decode
from siglip_dola.embedding.images import iter_embedded
from siglip_dola.embedding.pixel_batches import iter_pixel_batches
from siglip_dola.loading import autocast
from siglip_dola.readout.cuda_graphs import CallCache, GraphCache, check_capturable
from siglip_dola.scorer_inputs import (bank_rows, check_bank_dim, check_pixels, check_top_k, image_items,
                                      select_layers, text_queries)
from siglip_dola.scoring.checks import check_tau
from siglip_dola.settings import DoLaSettings, settings_for_model


class DoLaSigLIP:
    """DoLa scorer over a LoadedModel: classify images against a text bank, rerank texts or images."""

    def __init__(self, model, mode: str | None = None, alpha: float | None = None, layers=None, bucket=None,
                 n_buckets: int | None = None, static_layer=None, tau=None, batch_size: int = 32,
                 cuda_graphs: bool = False, contrast_weight: float | None = None,
                 calibration=None, settings: DoLaSettings | None = None, decode: str = "cpu"):
        # None arguments are "not given": see the module docstring for where their values come from.
        # calibration: a calibrate JSON path, "embedded" or "none"; settings: an already resolved DoLaSettings
        # cuda_graphs=True: each call (readout + scoring in score_pixels) replayed from a CUDA graph captured per
        # batch shape (readout/cuda_graphs.py), with no host sync per call
        # decode: where image files are decoded, "cpu" (PIL) or "gpu" (nvJPEG on the model's CUDA device)
        if cuda_graphs is not True and cuda_graphs is not False:
            raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs:
            check_capturable(model.readout)   # at construction, not at the first call
        if cuda_graphs and torch.device(model.device).type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, got {model.device}")
        check_decode(decode, model.device)
        self.model, self.cuda_graphs, self.decode = model, cuda_graphs, decode
        self._readout = GraphCache(model.readout) if cuda_graphs else model.readout
        if settings is None:
            settings = settings_for_model(model, calibration, mode=mode, alpha=alpha, layers=layers, bucket=bucket,
                                          n_buckets=n_buckets, static_layer=static_layer,
                                          contrast_weight=contrast_weight)
        layers = model.readout.check_layers(settings.layers)   # a given DoLaSettings' raw layers: checked once, here
        if layers is not settings.layers:
            settings = dataclasses.replace(settings, layers=layers)
        self.settings = settings   # THE DoLa configuration: every call below reads it whole
        self._graphed_scores = CallCache() if cuda_graphs else None
        self._graph_bank = None   # (source bank key, the fp32 bank on the device the graphs read)
        self.tau = check_tau(model.tau if tau is None else tau)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    @classmethod
    def from_calibration(cls, path: str | os.PathLike, model, **overrides) -> "DoLaSigLIP":
        """A scorer configured by a calibration JSON path or "embedded" (schema: evaluation/calibrate.py);
        `overrides` (constructor arguments) win."""
        return cls(model, calibration=path, **overrides)

    # ------------------------------------------------------------ embeddings
    def _packed(self) -> bool:
        return bool(getattr(self.model.readout, "packed_inputs", False))

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixels [B, 3, H, W] -> (z_final [B, D], z_layers [J, B, D] or None without layers), fp32; one forward."""
        check_pixels(pixels, self._packed())
        with torch.inference_mode(), autocast(self.model.device, self.model.dtype):
            z_final, z_layers = self._readout(pixels.to(self.model.device), self.settings.layers)
        z_layers = z_layers.float() if self.settings.layers else None
        return z_final.float(), z_layers

    def _batches(self, images) -> Iterator[tuple[list, torch.Tensor | None, list]]:
        """(ids, pixels [B, 3, H, W] on the device, skipped [(path, error)]) per batch (embedding.pixel_batches)."""
        items, positional = image_items(images, self._packed())
        for batch in iter_pixel_batches(self.model, items, self.batch_size, decode=self.decode):
            yield (batch.indices if positional else batch.ids), batch.pixels, batch.skipped

    # ------------------------------------------------------------ image -> texts
    def score_pixels(self, pixels: torch.Tensor, bank_embeds: torch.Tensor) -> scoring.DoLaResult:
        """DoLaResult for pixels [B, 3, H, W] against bank_embeds [C, D] (one backbone forward)."""
        if self._graphed_scores is not None:
            return self._score_graphed(pixels, bank_embeds)
        z_final, z_layers = self.embed(pixels)
        bank_embeds = bank_embeds.to(device=z_final.device, dtype=torch.float32)
        return scoring.score(z_final, z_layers, bank_embeds, self.tau, self.settings)

    def _score_graphed(self, pixels: torch.Tensor, bank_embeds: torch.Tensor) -> scoring.DoLaResult:
        """score_pixels as ONE replayed CUDA graph (readout + scoring; captured per shape and bank), no host sync:
        the NaN/inf check is deferred to ``result.nonfinite`` (checked where rows are read, in :meth:`_rows`)."""
        check_pixels(pixels)
        pixels = pixels.to(self.model.device)
        bank_key = (bank_embeds.data_ptr(), bank_embeds._version, tuple(bank_embeds.shape), bank_embeds.dtype,
                    bank_embeds.device)
        if self._graph_bank is None or self._graph_bank[0] != bank_key:   # the graphs read the bank's memory:
            self._graphed_scores = CallCache()                      # keep it, capture again for another
            self._graph_bank = (bank_key, bank_embeds.to(device=pixels.device, dtype=torch.float32))
        bank_embeds = self._graph_bank[1]

        layers = self.settings.layers

        def call(images):
            z_final, z_layers = self.model.readout(images, layers)
            result = scoring.score(z_final.float(), z_layers.float() if layers else None, bank_embeds,
                                   self.tau, self.settings, validate=False)
            return tuple(getattr(result, f.name) for f in dataclasses.fields(result))
        key = (tuple(layers), self.model.readout.derived_key())   # new weights: capture again
        with autocast(self.model.device, self.model.dtype):
            outputs = self._graphed_scores(call, pixels, key)
        return scoring.DoLaResult(*outputs)

    def iter_classify(self, images, bank, top_k: int | None = 5, key: str = "label") -> Iterator[tuple[list, list]]:
        """Per batch: (results, skipped); results as in :meth:`classify`, skipped [(path, error)]."""
        labels, embeds = bank_rows(bank, self.model)
        top_k = len(labels) if top_k is None else check_top_k(top_k)
        for ids, pixels, skipped in self._batches(images):
            results = []
            if pixels is not None and len(ids):
                result = self.score_pixels(pixels, embeds)
                results = [dict(image=i, **row) for i, row in zip(ids, self._rows(result, labels, top_k, key))]
            yield results, skipped

    def classify(self, images, bank, top_k: int = 5) -> list[dict]:
        """Per image: {image, predictions [{label, score, baseline_score}] (top-k by DoLa score), premature_layer, jsd}.

        images: [B, 3, H, W] tensor, PIL images, or paths/folders/globs (bad files are skipped with a warning).
        bank: TextBank, list of labels, or [C, D] tensor. score = DoLa p_hat, baseline_score = q_N.
        """
        return self._collect(self.iter_classify(images, bank, top_k))

    def rerank(self, images, texts) -> list[dict]:
        """Image -> texts: per image {image, predictions [{text, score, baseline_score}] (all texts, best first), ...}."""
        return self._collect(self.iter_classify(images, texts, top_k=None, key="text"))

    @staticmethod
    def _collect(batches: Iterable[tuple[list, list]]) -> list[dict]:
        results, skipped = [], []
        for batch_results, batch_skipped in batches:
            results.extend(batch_results)
            skipped.extend(batch_skipped)
        if skipped:
            from siglip_dola.failures import all_failed_message, grouped_reasons

            if not results:
                raise ValueError(all_failed_message("images", skipped))
            warnings.warn(f"skipped {len(skipped)} unreadable image(s): {grouped_reasons(skipped)}", stacklevel=3)
        return results

    def _rows(self, result: scoring.DoLaResult, names: list, top_k: int, key: str) -> list[dict]:
        """One dict per example (row) of a DoLaResult: top-k ranked by (DoLa prob, then q_N)."""
        scoring.check_finite(result)   # deferred by the graphed path; a no-op otherwise
        probs, final = result.probs.float().cpu(), result.final_probs.float().cpu()
        order = torch.sort(final, dim=-1, descending=True, stable=True).indices  # ties among masked: by q_N
        order = order.gather(-1, torch.sort(probs.gather(-1, order), dim=-1, descending=True, stable=True).indices)
        jsd, premature = result.jsd.float().cpu(), result.premature_layer.cpu()  # (J, B), (B,): one copy each
        rows = []
        for b in range(probs.shape[0]):
            predictions = [{key: names[c], "score": float(probs[b, c]), "baseline_score": float(final[b, c])}
                           for c in order[b, :top_k].tolist()]
            layer = int(premature[b])
            rows.append({"predictions": predictions, "premature_layer": None if layer < 0 else layer,
                         "jsd": {j: float(jsd[i, b]) for i, j in enumerate(self.settings.layers)}})
        return rows

    # ------------------------------------------------------------ text -> images
    def iter_embed(self, images) -> Iterator[tuple[list, torch.Tensor | None, torch.Tensor | None, list]]:
        """Per batch: (ids, z_final [B, D], z_layers [J, B, D] or None, skipped) on CPU fp32; z_final None if all bad."""
        items, positional = image_items(images, self._packed())
        layers = self.settings.layers
        for batch in iter_embedded(self.model, items, layers, self.batch_size, readout=self._readout,
                                   decode=self.decode):
            if batch.z_final is None:
                yield [], None, None, batch.skipped
                continue
            ids = batch.indices if positional else batch.ids
            yield ids, batch.z_final, (batch.z_layers if layers else None), batch.skipped

    def embed_images(self, images) -> tuple[list, torch.Tensor, torch.Tensor | None]:
        """(ids, z_final [n, D], z_layers [J, n, D] or None) on CPU fp32 for all images (bad files skipped, warned)."""
        ids, finals, stacks, skipped = [], [], [], []
        for batch_ids, z_final, z_layers, batch_skipped in self.iter_embed(images):
            skipped.extend(batch_skipped)
            if z_final is not None:
                ids.extend(batch_ids)
                finals.append(z_final)
                stacks.append(z_layers)
        if skipped:
            from siglip_dola.failures import grouped_reasons

            warnings.warn(f"skipped {len(skipped)} unreadable image(s): {grouped_reasons(skipped)}", stacklevel=2)
        if not finals:
            raise ValueError("images: no image could be decoded")
        return ids, torch.cat(finals), (torch.cat(stacks, dim=1) if self.settings.layers else None)  # (J, n, D)

    def rerank_images(self, text, images=None, *, image_embeds=None, embed_layers=None, ids=None,
                      top_k: int | None = None) -> list[dict]:
        """Text -> images: per query {text, ranking [{image, score, baseline_score}] best first, premature_layer, jsd}.

        The candidates are the images: q_N(i) = softmax_i(cos(t, z_N,i) / tau) and q_j likewise with the
        layer-j image embeddings; then the same DoLa formulas. Give `images` (run through the model) or
        precomputed `image_embeds=(z_final [n, D], z_layers [L, n, D])` with `embed_layers` naming the L
        layers stored (default: this scorer's layers) and optional `ids` (default 0..n-1).
        """
        if (images is None) == (image_embeds is None):
            raise ValueError("pass exactly one of images= or image_embeds=(z_final, z_layers)")
        if images is not None:
            ids, z_final, z_layers = self.embed_images(images)
        else:
            z_final, z_layers = select_layers(image_embeds, embed_layers, self.settings.layers)
            ids = list(range(z_final.shape[0])) if ids is None else list(ids)
        queries, text_embeds = text_queries(text, self.model)
        check_bank_dim(z_final, text_embeds.shape[-1], what="image embeddings")
        # log q over the images are valid logits for dola(): softmax is shift-invariant
        scores_final = scoring.build_log_probs_from_rep(text_embeds, z_final.float(), self.tau)  # (Q, n)
        scores_layers = None if z_layers is None else torch.stack(
            [scoring.build_log_probs_from_rep(text_embeds, z_j.float(), self.tau) for z_j in z_layers])  # (J, Q, n)
        result = scoring.dola(scores_final, scores_layers, self.settings)
        top_k = len(ids) if top_k is None else check_top_k(top_k)
        rows = self._rows(result, ids, top_k, key="image")
        return [{"text": q, "ranking": row.pop("predictions"), **row} for q, row in zip(queries, rows)]

def rerank_with_dola_siglip(image_tensor, text_bank, alpha: float = 0.1, candidate_layers=(18, 20, 22),
                            tau=None, model=None) -> scoring.DoLaResult:
    """The design note's entry point: DoLaResult (probs p_hat [B, C], final_probs q_N, premature_layer [B], jsd [J, B]).

    image_tensor [B, 3, H, W] (preprocessed); text_bank: TextBank or [C, D] tensor; model: LoadedModel
    (default: ``siglip_dola.load()``, the embedded model); dynamic early exit over `candidate_layers`.
    """
    if model is None:
        from siglip_dola.loading import load
        model = load()
    scorer = DoLaSigLIP(model, mode="dynamic", alpha=alpha, layers=list(candidate_layers), tau=tau)
    _, embeds = bank_rows(text_bank, model)
    return scorer.score_pixels(image_tensor, embeds)
