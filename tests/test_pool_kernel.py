"""readout/kernel.py: the Triton kernel's shifted mode (pooling from the next block's own LayerNorm output),
head counts that are not a power of two and the Triton merge of token splits with the value product, in
Triton's CPU interpreter (a subprocess), against float64.

The stats mode end to end and the split plan are also tested in test_pooler.py.
"""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from interpreter import run_interpreted
from siglip_dola.readout import kernel, map_head

CHECK = textwrap.dedent("""
    import json, os
    assert os.environ["TRITON_INTERPRET"] == "1"   # set before triton is imported
    import torch, torch.nn.functional as F
    from siglip_dola.readout import kernel, map_head
    torch.manual_seed(5)
    errors = {}
    # (B, T, D, H, layout): T % 16 != 0, D not a power of two, 12 heads (ViT-B) and 2 heads padded to 16
    for B, T, D, H, layout in [(2, 37, 48, 4, "btd"), (2, 32, 64, 12, "bdt"), (1, 16, 32, 16, "btd"),
                               (3, 21, 16, 2, "bdt"), (2, 48, 128, 16, "bdt")]:
        x = torch.randn(B, T, D) * 2 + 0.5 if layout == "btd" else (torch.randn(B, D, T) * 2 + 0.5).transpose(1, 2)
        gamma = (torch.rand(D) * 1.5 + 0.2) * torch.where(torch.rand(D) < 0.2, -1.0, 1.0)   # some negative
        beta = torch.randn(D) * 2
        n = F.layer_norm(x, (D,), gamma, beta, 1e-6)        # what the next block's first norm returns
        probe = torch.randn(H, D) * 0.3
        ref = map_head.pool_tokens(x.double(), probe.double(), 1e-6)                # float64, from the raw tokens
        for slots in (1, 4, 64):
            per_split, splits = kernel.split_plan(B, T, slots)
            for mode in ("shifted", "stats"):
                out = torch.full((B, H, splits, D), float("nan"))   # poisoned: every element must be written
                lse = torch.full((B, H, splits), float("nan"))
                if mode == "shifted":
                    kernel.pool_partials(n, (probe / gamma).contiguous(), None, out, lse, per_split,
                                     shift=beta, scale=1.0 / gamma)
                else:
                    kernel.pool_partials(x, probe, 1e-6, out, lse, per_split)
                pooled = kernel.combine_partials(out, lse).double()
                errors[f"{mode}/{B}x{T}x{D}/h{H}/{layout}/s{splits}"] = float((pooled - ref).norm() / ref.norm())
    # rows <= 16 (one 16-row block: batch 1) and more; splits 1..36, padded to powers of two
    for rows, heads, splits, dim, head_dim in [(70, 4, 2, 48, 12), (5, 16, 36, 128, 64), (130, 2, 1, 64, 16),
                                               (3, 16, 8, 256, 64), (23, 16, 6, 128, 64)]:
        out, lse = torch.randn(rows, heads, splits, dim), torch.randn(rows, heads, splits) * 3   # merge + W_v
        weight, bias = torch.randn(heads, head_dim, dim) * 0.1, torch.randn(heads, head_dim)
        values = kernel.merge_values_triton(out, lse, weight, bias).double()
        ref = map_head.head_values(kernel.combine_partials(out.double(), lse.double()), weight.double(), bias.double())
        errors[f"merge/{rows}x{heads}/s{splits}/d{dim}/e{head_dim}"] = float((values - ref).norm() / ref.norm())
    print(json.dumps(errors))
""")


def test_shifted_mode_and_padded_heads_in_interpreter_match_float64():
    errors = run_interpreted(CHECK)
    assert len(errors) >= 5 * 2 * 2 and any("/h12/" in name for name in errors)
    assert {name.split("/")[0] for name in errors} == {"shifted", "stats", "merge"}
    for name, error in errors.items():
        limit = 1e-6 if name.startswith("merge") else 2e-3   # the merge is fp32 (3 x TF32 products on a GPU)
        assert error == error and error < limit, (name, error)   # fp16 products, fp32 accumulation; NaN fails


def test_shift_identity_the_kernel_relies_on():
    """(n - beta) . (p / gamma) = x_hat . p and mean_t a_t (n_t - beta) / gamma = mean_t a_t x_hat_t, in float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 24, dtype=torch.float64) * 3 + 1
    gamma, beta = torch.rand(24, dtype=torch.float64) + 0.1, torch.randn(24, dtype=torch.float64)
    probe = torch.randn(4, 24, dtype=torch.float64)
    n = F.layer_norm(x, (24,), gamma, beta, 1e-6)
    x_hat = F.layer_norm(x, (24,), eps=1e-6)
    torch.testing.assert_close((n - beta) @ (probe / gamma).T, x_hat @ probe.T)
    weights = torch.softmax(x_hat @ probe.T, dim=1)                                  # (B, T, H)
    pooled_n = torch.einsum("bth,btd->bhd", weights, n - beta) / gamma
    torch.testing.assert_close(pooled_n, map_head.pool_tokens(x, probe, 1e-6))


@pytest.mark.parametrize("batch,num_tokens,slots,block_t,splits", [
    (64, 576, 132, 16, 2),    # ViT-L/16-384 at batch 64 on an H100: one wave of 128 programs
    (256, 576, 132, 16, 1),   # more images than SMs: no split
    (1, 576, 132, 16, 8),     # batch 1: MAX_SPLITS splits of 5 token blocks (the merge walks splits in sequence)
    (8, 576, 132, 32, 6),     # 18 blocks: 6 splits of 3 (8 would leave the same 3 blocks per split)
])
def test_split_plan_fills_whole_waves(batch, num_tokens, slots, block_t, splits):
    per_split, got = kernel.split_plan(batch, num_tokens, slots, block_t)
    assert got == splits and per_split * splits >= num_tokens > per_split * (splits - 1)
