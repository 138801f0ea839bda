"""The folded MAP (multihead attention-pooling) head: exact, cheap pooling of an intermediate layer.

SigLIP's head attends from ONE learned query q to the final-normed tokens n_t = gamma * x_hat_t + beta.
For head h, with key weights W_k,h and scale s:

    logit[t, h] = s * q_h . (W_k,h n_t + b_k,h) = x_hat_t . (gamma * s W_k,h^T q_h) + const_h

const_h is the same for every token, so it drops out of the softmax (key bias and beta vanish). The
attention weights sum to 1, so the value projection commutes with pooling:

    v_h = sum_t a[t, h] (W_v,h n_t + b_v,h) = (W_v,h diag(gamma)) (sum_t a[t, h] x_hat_t) + (W_v,h beta + b_v,h)

The only work over all T tokens is the LayerNorm statistics, x_hat @ key_probe^T (T x D x H) and the
weighted token sum (H x T x D); W_v, the output projection and the norm + MLP residual run on one
vector per image (the model's own modules, called as they are). At ViT-L/16-384 the head drops from
about 2.4 to 0.06 GFLOP per image per layer.

Precision: the folded weights and the pooling are computed in float32 (float64 when the model is
float64) with autocast off; the tail then runs through the model's own modules in their dtype (under
the caller's autocast, if any), exactly as the model's head would.

Detection, not assumption: :func:`timm_map_parts` / :func:`hf_map_parts` return None for any head that
is not exactly this form (qk-norm, latent position embedding, more than one latent, prefix tokens,
extra attention biases, ...), and :func:`fold` returns None for a final norm other than LayerNorm or
Identity; the readout then uses the model's own head.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

Tail = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MapHeadParts:
    """A single-query attention-pooling head, taken apart (tensors are the model's own, never written)."""

    query: torch.Tensor          # (D,) the projected query, bias included
    key_weight: torch.Tensor     # (D, D_in) rows grouped by head
    value_weight: torch.Tensor   # (D, D_in)
    value_bias: torch.Tensor | None   # (D,)
    num_heads: int
    scale: float
    tail: Tail                   # (B, D) heads' values concatenated -> (B, D_out) final embedding


@dataclass(frozen=True)
class FoldedMapHead:
    """Final norm + MAP head folded into per-head probes; call it on raw block outputs (B, T, D)."""

    key_probe: torch.Tensor      # (H, D)      gamma * s * W_k,h^T q_h
    value_weight: torch.Tensor   # (H, hd, D)  W_v,h diag(gamma)
    value_bias: torch.Tensor     # (H, hd)     W_v,h beta + b_v,h
    norm_eps: float | None       # None: the final norm is Identity (no standardisation)
    tail: Tail
    tail_dtype: torch.dtype      # dtype of the model's head modules

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw block output (B, T, D) -> concatenated head values (B, D), before the output projection."""
        return head_values(pool_tokens(tokens, self.key_probe, self.norm_eps), self.value_weight, self.value_bias)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw block output (B, T, D) -> embedding (B, D_out), equal to head(norm(tokens))."""
        return self.tail(self.pool(tokens).to(self.tail_dtype))


def pool_tokens(tokens: torch.Tensor, key_probe: torch.Tensor, norm_eps: float | None) -> torch.Tensor:
    """THE PyTorch reference of the pooling: tokens (B, T, D) raw block output, key_probe (H, D) -> (B, H, D),
    pooled[b, h] = sum_t softmax_t(x_hat[b, t] . key_probe[h]) x_hat[b, t]; x_hat = LayerNorm(x) without affine
    (``norm_eps`` None: x itself). In key_probe's dtype with autocast off. The Triton kernel is tested against it."""
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x_hat = tokens.to(key_probe.dtype)
        if norm_eps is not None:
            x_hat = F.layer_norm(x_hat, x_hat.shape[-1:], eps=norm_eps)          # (B, T, D) affine folded away
        weights = torch.softmax(x_hat @ key_probe.T, dim=1)                      # (B, T, H) over tokens
        return torch.einsum("bth,btd->bhd", weights, x_hat)                      # (B, H, D)


def head_values(pooled: torch.Tensor, value_weight: torch.Tensor, value_bias: torch.Tensor) -> torch.Tensor:
    """pooled (N, H, D), value_weight (H, hd, D), value_bias (H, hd) -> head values (N, H * hd), autocast off.

    In the folded head's dtype (fp32): bf16 products here were not measurably faster and made the bf16
    premature layer differ from fp32 on 1 of 8 images (docs/performance-notes.md)."""
    with torch.autocast(device_type=pooled.device.type, enabled=False):
        values = torch.bmm(pooled.transpose(0, 1), value_weight.transpose(1, 2))  # (H, N, hd)
        return (values.transpose(0, 1) + value_bias).flatten(1)                   # (N, H * hd)


def _fold_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _norm_affine(norm: nn.Module, dim: int, like: torch.Tensor):
    """(gamma, beta, eps) of a LayerNorm / Identity final norm, or None for anything else."""
    ones, zeros = torch.ones(dim, dtype=like.dtype, device=like.device), torch.zeros(dim, dtype=like.dtype, device=like.device)
    if isinstance(norm, nn.Identity):
        return ones, zeros, None
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (dim,):
        return None
    gamma = norm.weight.detach().to(like) if norm.weight is not None else ones
    beta = norm.bias.detach().to(like) if norm.bias is not None else zeros
    return gamma, beta, float(norm.eps)


@torch.no_grad()
def fold(parts: MapHeadParts, norm: nn.Module) -> FoldedMapHead | None:
    """Fold ``norm`` (LayerNorm or Identity) and the query of ``parts`` into a FoldedMapHead; None if unsupported."""
    dtype = _fold_dtype(parts.key_weight)
    key_weight, value_weight = parts.key_weight.detach().to(dtype), parts.value_weight.detach().to(dtype)
    dim_out, dim_in = key_weight.shape
    heads = parts.num_heads
    head_dim = dim_out // heads
    affine = _norm_affine(norm, dim_in, key_weight)
    if affine is None:
        return None
    gamma, beta, eps = affine
    query = parts.query.detach().to(dtype).reshape(heads, head_dim)                      # (H, hd)
    query_key = torch.einsum("hk,hkd->hd", query, key_weight.reshape(heads, head_dim, dim_in))  # (H, D)
    value_bias = value_weight @ beta                                                     # (D,)
    if parts.value_bias is not None:
        value_bias = value_bias + parts.value_bias.detach().to(dtype)
    return FoldedMapHead(
        key_probe=(parts.scale * query_key * gamma).contiguous(),
        value_weight=(value_weight * gamma).reshape(heads, head_dim, dim_in).contiguous(),
        value_bias=value_bias.reshape(heads, head_dim).contiguous(),
        norm_eps=eps,
        tail=parts.tail,
        tail_dtype=parts.value_weight.dtype,
    )


def _is_single_query_timm_pool(pool: nn.Module) -> bool:
    needed = ("latent", "q", "kv", "q_norm", "k_norm", "proj", "num_heads", "head_dim")
    if not all(hasattr(pool, name) for name in needed):
        return False
    return (pool.latent.dim() == 3 and pool.latent.shape[:2] == (1, 1)
            and getattr(pool, "latent_len", 1) == 1
            and getattr(pool, "pos_embed", None) is None
            and isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)
            and isinstance(pool.kv, nn.Linear) and isinstance(pool.q, (nn.Linear, nn.Identity))
            and getattr(pool, "pool", "token") in ("token", "avg")
            and pool.kv.out_features == 2 * pool.num_heads * pool.head_dim)


def timm_map_parts(pool: nn.Module, post: Tail) -> MapHeadParts | None:
    """Parts of a timm ``AttentionPoolLatent`` (timm 0.9 / 1.x, Janus); ``post`` maps its output to the embedding."""
    if not _is_single_query_timm_pool(pool):
        return None
    dim = pool.num_heads * pool.head_dim
    query = pool.q(pool.latent.detach())[0, 0] if isinstance(pool.q, nn.Linear) else pool.latent.detach()[0, 0]
    kv_bias = pool.kv.bias

    def tail(values: torch.Tensor) -> torch.Tensor:
        x = pool.proj_drop(pool.proj(values)) if hasattr(pool, "proj_drop") else pool.proj(values)
        if getattr(pool, "mlp", None) is not None:
            x = x + pool.mlp(pool.norm(x))
        return post(x)

    return MapHeadParts(
        query=query.detach(), key_weight=pool.kv.weight[:dim], value_weight=pool.kv.weight[dim:],
        value_bias=None if kv_bias is None else kv_bias[dim:], num_heads=pool.num_heads,
        scale=float(pool.scale) if hasattr(pool, "scale") else pool.head_dim ** -0.5, tail=tail,
    )


def hf_map_parts(head: nn.Module) -> MapHeadParts | None:
    """Parts of a HF ``SiglipMultiheadAttentionPoolingHead`` (probe + nn.MultiheadAttention + norm/MLP residual)."""
    attention = getattr(head, "attention", None)
    probe = getattr(head, "probe", None)
    if not (isinstance(attention, nn.MultiheadAttention) and isinstance(probe, torch.Tensor)
            and probe.shape[:2] == (1, 1) and attention._qkv_same_embed_dim
            and attention.bias_k is None and attention.bias_v is None and not attention.add_zero_attn
            and hasattr(head, "layernorm") and hasattr(head, "mlp")):
        return None
    dim, heads = attention.embed_dim, attention.num_heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    query = F.linear(probe.detach()[0, 0], weight[:dim], None if bias is None else bias[:dim])

    def tail(values: torch.Tensor) -> torch.Tensor:
        x = attention.out_proj(values)
        return x + head.mlp(head.layernorm(x))

    return MapHeadParts(
        query=query.detach(), key_weight=weight[dim:2 * dim], value_weight=weight[2 * dim:],
        value_bias=None if bias is None else bias[2 * dim:], num_heads=heads,
        scale=(dim // heads) ** -0.5, tail=tail,
    )
