"""The design note's steps one at a time, from representations or probabilities: each checks its inputs,
calls the log-space core (logspace.py) and reads its device-side checks once, at its end.

build_probs_from_rep: q = softmax(cos(z, t_c) / tau); jsd: JSD(p || q); select_early_exit: M = argmax_j
JSD(q_N || q_j); contrast_and_mask: p_hat = softmax_{V_head}(log q_N - lambda * log q_M).
"""
from __future__ import annotations

import numpy as np
import torch

from siglip_dola.scoring.checks import (
    as_tensor, check_alpha, check_bank, check_contrast_weight, check_compat, check_layers, check_stacked, check_tau,
    finite_check, pair, probability_check, promote, raise_failed, to_output,
)
from siglip_dola.scoring.logspace import contrast_log, layer_table, log_finite, rep_logits, select_position, true_jsd


def build_log_probs_from_rep(z, text_bank, tau):
    """log q [..., C] = log_softmax(cos(z, t_c) / tau) for z [..., D], text_bank [C, D]."""
    z_t, to_numpy = as_tensor(z, "z")
    bank, _ = as_tensor(text_bank, "text_bank", like=z_t)
    tau = check_tau(tau)
    check_bank(bank, z_t, "z")
    z_t, bank = promote(z_t, bank)
    log_q = torch.log_softmax(rep_logits(z_t, bank, tau), dim=-1)
    raise_failed([finite_check(z_t, "z"), finite_check(bank, "text_bank")])
    return to_output(log_q, to_numpy)


def build_probs_from_rep(z, text_bank, tau):
    """q [..., C] = softmax(cos(z, t_c) / tau) for z [..., D], text_bank [C, D]."""
    log_q = build_log_probs_from_rep(z, text_bank, tau)
    return np.exp(log_q) if isinstance(log_q, np.ndarray) else torch.exp(log_q)


def jsd(p, q):
    """True Jensen-Shannon divergence (natural log) over the last axis: p, q [..., C] -> [...], in [0, ln 2]."""
    p_t, q_t, to_numpy = pair(p, q, "p", "q")
    if p_t.shape[-1] != q_t.shape[-1]:
        raise ValueError(f"p and q must have the same number of classes, got {p_t.shape[-1]} and {q_t.shape[-1]}")
    try:
        torch.broadcast_shapes(p_t.shape, q_t.shape)
    except RuntimeError:
        raise ValueError(f"p and q shapes must broadcast, got {list(p_t.shape)} and {list(q_t.shape)}") from None
    value = true_jsd(log_finite(p_t), log_finite(q_t), p_t, q_t)
    raise_failed([probability_check(p_t, "p"), probability_check(q_t, "q")])
    return to_output(value, to_numpy)


def select_early_exit(q_N, q_layers, layers, compat=None):
    """(premature_layer [...] int64 layer numbers, jsd_table [J, ...]) for q_N [..., C], q_layers [J, ..., C].

    Per example M = argmax_j JSD(q_N, q_j); exact ties go to the layer listed earliest in ``layers``.
    """
    check_compat(compat)
    q_final, q_stack, to_numpy = pair(q_N, q_layers, "q_N", "q_layers")
    layers = check_layers(layers, q_stack.shape[0])
    check_stacked(q_stack, q_final, "q_layers", "q_N")
    log = torch.log if compat else log_finite  # the official value keeps log 0 = -inf
    position, table = select_position(log(q_final), log(q_stack), q_final, q_stack, compat)
    premature = layer_table(tuple(layers), position.device)[position]
    raise_failed([probability_check(q_final, "q_N"), probability_check(q_stack, "q_layers")])
    return to_output(premature, to_numpy), to_output(table, to_numpy)


def contrast_and_mask(q_N, q_M, alpha: float = 0.1, contrast_weight: float = 1.0):
    """(p_hat [..., C], log_p_hat [..., C]) = softmax over V_head of log q_N - lambda * log q_M; masked: 0 / -inf."""
    alpha, contrast_weight = check_alpha(alpha), check_contrast_weight(contrast_weight)
    q_final, q_early, to_numpy = pair(q_N, q_M, "q_N", "q_M")
    if q_final.shape != q_early.shape:
        raise ValueError(f"q_N and q_M must have the same shape, got {list(q_final.shape)} and {list(q_early.shape)}")
    log_p_hat = contrast_log(torch.log(q_final), torch.log(q_early), alpha, q_M_may_be_zero=True,
                             contrast_weight=contrast_weight)
    raise_failed([probability_check(q_final, "q_N"), probability_check(q_early, "q_M"),
                  ((q_final.amax(dim=-1) <= 0).sum(), "q_N must have a positive entry in every row (it is a distribution)")])
    return to_output(torch.exp(log_p_hat), to_numpy), to_output(log_p_hat, to_numpy)
