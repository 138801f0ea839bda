"""Pure DoLa math for SigLIP zero-shot scoring: tensors/arrays in and out, no I/O, no model classes.

The candidate classes/texts play the role of the vocabulary: q_j = softmax(cos(z_j, t_c) / tau).
Dynamic DoLa picks per example M = argmax_j JSD(q_N || q_j) over the candidate layers, keeps
V_head = {c : q_N(c) >= alpha * max q_N} and returns p_hat = softmax_{V_head}(log q_N - lambda * log q_M),
lambda = ``contrast_weight`` (1: the design note's formula, the default; 0: q_N renormalised on V_head).

Conventions
- torch tensors (any device; fp16/bf16/fp32 computed in float32, float64 kept) and numpy arrays are
  accepted; results are of the input's kind (numpy in -> numpy out), float32 (float64 for float64
  input), on the input's device. Everything is batched over any leading dims ``...``.
- One host sync per call, at its end: shapes, alpha, tau and layers are checked eagerly (metadata);
  NaN/inf/probability checks are device-side values read ONCE after all the math is queued (on CUDA
  it queues behind the forward), raising the ValueError naming the argument. Layer-number tables are
  cached per device, since a host->device copy synchronises too.
- Work happens in log space, so nothing underflows to NaN for C up to 200,000 and logits up to +-1e4.
- Tie rule: when several layers reach exactly the same maximal JSD, the one listed EARLIEST in
  ``layers`` wins.
- q_M(c) = 0 on a kept class makes F(c) = +inf. Then p_hat puts all its mass, split equally, on the
  kept classes with F = +inf (the limit of the softmax when those classes' F grows without bound).
- ``compat="official-dola"`` reproduces the official DoLa code (voidism/DoLa, and HF transformers'
  ``_dola_select_contrast``) for people reproducing it: its "JSD" calls ``F.kl_div(log P, M)``,
  i.e. 0.5 * (KL(M||P) + KL(M||Q)), averaged (not summed) over the classes, and it averages that
  over the whole batch so ONE layer is chosen for all examples. The default (``compat=None``) is
  the true JSD with a per-example layer choice. Contrast and masking are the same in both.

Modules: ``logspace.py`` the log-space core (the ONE eager reference of each formula, and DoLaResult),
``steps.py`` the design note's steps one at a time, ``pipeline.py`` whole calls (``dola`` from logits,
``score`` from representations), ``checks.py`` input and value checks, ``kernel.py`` score's Triton kernel.
"""
from __future__ import annotations

from siglip_dola.scoring.checks import COMPAT_MODES
from siglip_dola.scoring.logspace import DoLaResult
from siglip_dola.scoring.pipeline import check_finite, dola, score
from siglip_dola.scoring.steps import (
    build_log_probs_from_rep, build_probs_from_rep, contrast_and_mask, jsd, select_early_exit,
)

__all__ = ["COMPAT_MODES", "DoLaResult", "build_log_probs_from_rep", "build_probs_from_rep", "check_finite",
           "contrast_and_mask", "dola", "jsd", "score", "select_early_exit"]
