"""Tests for siglip_dola.readout.map_head: the folded MAP head equals the model's own norm + head."""
import inspect

import pytest
import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from siglip_dola.readout.map_head import fold, hf_map_parts, timm_map_parts

DIM, HEADS, TOKENS = 32, 4, 9
# timm's AttentionPoolLatent without a query projection (q_proj=False) came after timm 1.0.26
NO_Q_PROJ = pytest.param({"q_proj": False}, marks=pytest.mark.skipif(
    "q_proj" not in inspect.signature(AttentionPoolLatent).parameters,
    reason="this timm's AttentionPoolLatent has no q_proj option (the head form does not exist here)"))


def _identity(x):
    return x


def _rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _randomise(module, seed):
    """Random weights everywhere (LayerNorm gamma/beta too, so folding them is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)
    return module.eval()


def _timm_pool(seed=0, **kwargs):
    return _randomise(AttentionPoolLatent(DIM, num_heads=HEADS, norm_layer=nn.LayerNorm, **kwargs), seed)


def _hf_head(seed=0):
    config = SiglipVisionConfig(hidden_size=DIM, intermediate_size=2 * DIM, num_attention_heads=HEADS)
    return _randomise(SiglipMultiheadAttentionPoolingHead(config), seed)


def _final_norm(seed=1):
    return _randomise(nn.LayerNorm(DIM, eps=1e-6), seed)


def _tokens(dtype=torch.float32, batch=3, seed=2):
    return torch.randn(batch, TOKENS, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) * 3


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("pool_kwargs", [{}, {"qkv_bias": False}, NO_Q_PROJ])
def test_folded_timm_head_equals_model_head(dtype, tol, pool_kwargs):
    pool, norm = _timm_pool(**pool_kwargs).to(dtype), _final_norm().to(dtype)
    folded = fold(timm_map_parts(pool, _identity), norm)
    tokens = _tokens(dtype)
    with torch.no_grad():
        assert _rel_err(folded(tokens), pool(norm(tokens))) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_folded_hf_head_equals_model_head(dtype, tol):
    head, norm = _hf_head().to(dtype), _final_norm().to(dtype)
    folded = fold(hf_map_parts(head), norm)
    tokens = _tokens(dtype)
    with torch.no_grad():
        assert _rel_err(folded(tokens), head(norm(tokens))) < tol


def test_identity_final_norm_is_folded_without_standardising():
    pool = _timm_pool().double()
    folded = fold(timm_map_parts(pool, _identity), nn.Identity())
    tokens = _tokens(torch.float64)
    with torch.no_grad():
        assert _rel_err(folded(tokens), pool(tokens)) < 1e-12


def test_tied_tokens_pool_to_the_single_token():
    """All tokens identical: attention is uniform (a full tie) and the head sees one token."""
    pool, norm = _timm_pool().double(), _final_norm().double()
    folded = fold(timm_map_parts(pool, _identity), norm)
    token = _tokens(torch.float64, batch=2)[:, :1]                    # (B, 1, D)
    with torch.no_grad():
        tied = folded(token.expand(-1, TOKENS, -1))
        assert _rel_err(tied, pool(norm(token))) < 1e-12
        assert _rel_err(tied, folded(token)) < 1e-12


def test_post_pool_modules_are_applied():
    pool, norm, proj = _timm_pool().double(), _final_norm().double(), _randomise(nn.Linear(DIM, 5), 3).double()
    folded = fold(timm_map_parts(pool, proj), norm)
    tokens = _tokens(torch.float64)
    with torch.no_grad():
        assert _rel_err(folded(tokens), proj(pool(norm(tokens)))) < 1e-12


def test_folding_writes_nothing_into_the_model():
    pool, norm = _timm_pool(), _final_norm()
    before = {k: v.clone() for k, v in {**pool.state_dict(), **norm.state_dict()}.items()}
    fold(timm_map_parts(pool, _identity), norm)
    after = {**pool.state_dict(), **norm.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("pool_kwargs", [
    {"qk_norm": True}, {"latent_len": 2}, {"pos_embed": "abs", "feat_size": TOKENS},
])
def test_other_timm_head_forms_are_not_folded(pool_kwargs):
    assert timm_map_parts(_timm_pool(**pool_kwargs), _identity) is None


def test_hf_head_with_extra_key_bias_is_not_folded():
    head = _hf_head()
    head.attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True, add_bias_kv=True)
    assert hf_map_parts(head) is None


def test_non_layernorm_final_norm_is_not_folded():
    parts = timm_map_parts(_timm_pool(), _identity)
    assert fold(parts, nn.RMSNorm(DIM)) is None
    assert fold(parts, nn.LayerNorm(DIM + 1)) is None
