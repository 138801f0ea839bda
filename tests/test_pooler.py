"""readout/pooler.py and layer_pooler.py: the PyTorch path against the model's own norm + MAP head, the split/merge math
against a naive loop, and the Triton kernels (CPU interpreter, in a subprocess) against float64."""
import textwrap

import pytest
import timm
import torch

from interpreter import run_interpreted
from siglip_dola import config
from siglip_dola.readout import kernel, layer_pooler, map_head
from siglip_dola.readout.entry_norm import entry_norm
from siglip_dola.readout.pooler import Pooling

DIM, HEADS = 48, 4


def tiny_tower(seed: int = 0):
    """A random timm ViT with a MAP head; weights scaled up so the attention is far from uniform."""
    torch.manual_seed(seed)
    tower = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=2,
                              embed_dim=DIM, num_heads=HEADS, img_size=32).eval()
    with torch.no_grad():
        for param in list(tower.attn_pool.parameters()) + list(tower.norm.parameters()):
            param.normal_(0.0, 0.3)
    return tower


def folded_head(tower):
    return map_head.fold(map_head.timm_map_parts(tower.attn_pool, post=lambda pooled: pooled), tower.norm)


def own_head(tower, tokens):
    """The model's own path: final norm, then the MAP head (B, T, D) -> (B, D)."""
    return tower.forward_head(tower.norm(tokens))


def tokens_like_a_block(batch=3, num_tokens=21, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, DIM, generator=generator) * 2.5 + 0.7  # (B, T, D) off-centre


def test_reference_path_equals_the_models_own_head():
    tower = tiny_tower()
    folded = folded_head(tower)
    tokens = tokens_like_a_block()
    with torch.no_grad():
        pooled = map_head.pool_tokens(tokens, folded.key_probe, folded.norm_eps)        # (B, H, D)
        values = map_head.head_values(pooled, folded.value_weight, folded.value_bias)
        got, expected = folded.tail(values), own_head(tower, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_layer_pooler_on_cpu_reads_every_slot_like_the_model():
    tower = tiny_tower(seed=3)
    folded = folded_head(tower)
    layers = [tokens_like_a_block(seed=s) for s in (4, 5, 6)]
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    with torch.no_grad():
        pooler = layer_pooler.LayerPooler(folded, [1, 2, 3])
        for slot in (2, 0, 1):  # any order: slots are positions in the requested layers
            pooler.add(slot, layers[slot])
        z_layers = pooler.result()                                                        # (J, B, D)
        expected = torch.stack([own_head(tower, tokens) for tokens in layers])
    torch.testing.assert_close(z_layers, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())  # the model is not modified


def fake_kernel(fits: int, calls: list):
    """Stands in for the Triton launch: raises OutOfResources above `fits` stages, else fills the partials
    with an independent per-split softmax pooling (PyTorch reference per split + log-sum-exp of its logits)."""
    def pool_partials(tokens, probe, eps, out, lse, per_split, num_warps, block_t, num_stages, **shifted):
        assert not shifted   # these tests add raw block outputs
        calls.append(num_stages)
        if num_stages > fits:
            raise layer_pooler.OutOfResources(200_000, 166_912, "shared memory")
        for split in range(out.shape[2]):
            part = tokens[:, split * per_split:(split + 1) * per_split]
            x_hat = torch.nn.functional.layer_norm(part, part.shape[-1:], eps=eps)
            out[:, :, split] = map_head.pool_tokens(part, probe, eps)
            lse[:, :, split] = torch.logsumexp(x_hat @ probe.T, dim=1)
    return pool_partials


@pytest.mark.parametrize("fits,first_calls,second_calls", [(2, [3, 2, 2], [2, 2]), (0, [3, 2, 1], [])])
def test_pooler_uses_fewer_stages_or_pytorch_when_shared_memory_is_short(monkeypatch, caplog, fits, first_calls,
                                                                         second_calls):
    tower = tiny_tower(seed=3)
    folded = folded_head(tower)
    layers = [tokens_like_a_block(seed=s) for s in (4, 5)]
    calls = []
    monkeypatch.setattr(layer_pooler, "pool_partials", fake_kernel(fits, calls))
    monkeypatch.setattr(layer_pooler, "triton_usable", lambda tokens, probe: True)
    monkeypatch.setattr(layer_pooler, "_FITTING_STAGES", {})
    caplog.set_level("INFO", logger="siglip_dola.readout")
    with torch.no_grad():
        expected = torch.stack([own_head(tower, tokens) for tokens in layers])
        for expected_calls in (first_calls, first_calls + second_calls):   # a second call reuses what fitted
            with config.override(num_stages=3, target_programs=4):
                pooler = layer_pooler.LayerPooler(folded, [1, 2])
            pooler.add(0, layers[0])
            pooler.add(1, layers[1])
            torch.testing.assert_close(pooler.result(), expected, rtol=1e-4, atol=1e-5)
            assert calls == expected_calls
            assert set(pooler.paths.values()) == {"fused-stats" if fits > 0 else "pytorch"}
    fallbacks = [r for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(fallbacks) == (1 if fits == 0 else 0)   # the fall-back to PyTorch is logged once, with its reason
    assert all(r.levelname == "WARNING" and r.name == "siglip_dola.readout" for r in fallbacks)


def test_combine_partials_matches_softmax_over_all_tokens():
    """Per-split softmax pooling + log-sum-exp, merged, equals one softmax over all tokens (naive loop)."""
    generator = torch.Generator().manual_seed(7)
    x_hat = torch.randn(2, 19, DIM, generator=generator, dtype=torch.float64)
    logits = torch.randn(2, 19, HEADS, generator=generator, dtype=torch.float64) * 4
    logits[:, 16:] = logits[:, :3]  # ties across splits
    bounds = [(0, 5), (5, 16), (16, 19)]  # uneven splits
    out = torch.stack([torch.einsum("bth,btd->bhd", torch.softmax(logits[:, a:b], 1), x_hat[:, a:b])
                       for a, b in bounds], dim=2)                                        # (B, H, S, D)
    lse = torch.stack([torch.logsumexp(logits[:, a:b], 1) for a, b in bounds], dim=2)   # (B, H, S)
    expected = torch.zeros(2, HEADS, DIM, dtype=torch.float64)
    for b in range(2):  # naive: one softmax over all 19 tokens per (image, head)
        for h in range(HEADS):
            weights = torch.exp(logits[b, :, h] - logits[b, :, h].max())
            expected[b, h] = (weights[:, None] * x_hat[b]).sum(0) / weights.sum()
    torch.testing.assert_close(kernel.combine_partials(out, lse), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the merge stays fp32 under the caller's autocast
        merged = kernel.combine_partials(out.float(), lse.float())
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,num_tokens,target,block_t", [(1, 576, 264, 16), (64, 576, 264, 16),
                                                             (3, 37, 8, 16), (2, 5, 100, 16), (8, 577, 264, 32)])
def test_split_plan_covers_tokens_with_no_empty_split(batch, num_tokens, target, block_t):
    per_split, splits = kernel.split_plan(batch, num_tokens, target, block_t)
    starts = [s * per_split for s in range(splits)]
    assert per_split % block_t == 0 and all(start < num_tokens for start in starts)
    assert starts[-1] + per_split >= num_tokens and splits <= max(1, -(-target // batch))


def test_plain_fp32_keeps_the_exact_pytorch_path():
    tokens = tokens_like_a_block()
    probe = torch.randn(HEADS, DIM)
    assert not layer_pooler.triton_usable(tokens, probe)                       # CPU, no interpreter requested
    from siglip_dola.readout import from_model
    readout = from_model(deep_tower(seed=1))
    with torch.no_grad():
        readout(torch.randn(2, 3, 32, 32), [1, 2])
    assert readout.layer_paths == {1: "pytorch", 2: "pytorch"}
    assert "CUDA only" in readout.path_reasons[1]


INTERPRETER_CHECK = textwrap.dedent("""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"   # set before triton is imported
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_pooler import tiny_tower, folded_head, own_head, tokens_like_a_block, HEADS, DIM
    from siglip_dola import config
    from siglip_dola.readout import kernel, layer_pooler, map_head
    assert kernel.triton is not None
    SPLITS = [(1, 16), (8, 16), (64, 16), (8, 32)]   # (target programs, block_t)
    torch.manual_seed(11)
    tower = tiny_tower(seed=9)
    folded = folded_head(tower)
    probe, eps = folded.key_probe, folded.norm_eps
    cases = {
        "fp32": tokens_like_a_block(3, 37, seed=12),
        "bf16": tokens_like_a_block(2, 21, seed=13).bfloat16(),
        "fp16": tokens_like_a_block(2, 16, seed=14).half(),
        "timm_layout": (torch.randn(2, DIM, 23) * 3 + 1).transpose(1, 2),   # strides (T*D, 1, T)
        "one_token": tokens_like_a_block(2, 1, seed=15),
        "tied_tokens": tokens_like_a_block(2, 1, seed=16).expand(2, 35, DIM),   # every logit ties, T % 16 != 0
    }
    errors = {}
    for name, tokens in cases.items():
        batch, num_tokens, _ = tokens.shape
        reference = map_head.pool_tokens(tokens.double(), probe.double(), eps)
        for norm_eps in (eps, None):
            ref = reference if norm_eps is not None else map_head.pool_tokens(tokens.double(), probe.double(), None)
            for target, block_t in SPLITS:   # one split, several, as many as token blocks; uneven last split
                per_split, splits = kernel.split_plan(batch, num_tokens, target, block_t)
                partial = torch.full((batch, HEADS, splits, DIM), float("nan"))   # poisoned: all must be written
                lse = torch.full((batch, HEADS, splits), float("nan"))
                kernel.pool_partials(tokens, probe, norm_eps, partial, lse, per_split, block_t=block_t)
                pooled = kernel.combine_partials(partial, lse)
                key = f"one-pass/{name}/{norm_eps is not None}/{target}x{block_t}/{splits}"
                errors[key] = float((pooled - ref).norm() / ref.norm())
    # EVEN path (T a multiple of BLOCK_T and D a power of two: no masks, vector loads), timm layout too
    even_probe = torch.randn(HEADS, 64) * 0.3
    for name, tokens in {"even": torch.randn(2, 32, 64) * 2 + 0.5,
                         "even_timm_layout": (torch.randn(2, 64, 48) * 2 + 0.5).transpose(1, 2)}.items():
        for norm_eps in (1e-6, None):
            ref = map_head.pool_tokens(tokens.double(), even_probe.double(), norm_eps)
            for target, block_t in ((1, 16), (4, 16), (2, 32)):
                per_split, splits = kernel.split_plan(tokens.shape[0], tokens.shape[1], target, block_t)
                partial = torch.full((2, HEADS, splits, 64), float("nan"))
                lse = torch.full((2, HEADS, splits), float("nan"))
                kernel.pool_partials(tokens, even_probe, norm_eps, partial, lse, per_split, block_t=block_t)
                pooled = kernel.combine_partials(partial, lse)
                errors[f"one-pass/{name}/{norm_eps is not None}/{target}x{block_t}/{splits}"] = float(
                    (pooled - ref).norm() / ref.norm())
    layers = [tokens_like_a_block(2, 21, seed=s) for s in (20, 21)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # fp32 tokens under autocast: fast path
        for warps in (4, 8):
            with config.override(num_warps=warps, target_programs=6):
                pooler = layer_pooler.LayerPooler(folded, [1, 2])
            pooler.add(1, layers[1]); pooler.add(0, layers[0])
            z = pooler.result().float()
            assert set(pooler.paths.values()) == {"fused-stats"}, "the interpreter path must be taken"
            expected = torch.stack([own_head(tower, t) for t in layers]).float()
            errors[f"pooler/{warps}"] = float((z - expected).norm() / expected.norm())
    print(json.dumps(errors))
""")


def test_triton_kernels_in_interpreter_match_float64_reference():
    errors = run_interpreted(INTERPRETER_CHECK)
    assert len(errors) == 6 * 2 * 4 + 2 * 2 * 3 + 2
    assert {int(name.rsplit("/", 1)[1]) for name in errors if name.startswith("one-pass/fp32")} == {1, 2, 3}
    for name, error in errors.items():
        # fp16 products with fp32 accumulation: ~3e-4 on fp32 inputs; the pooler row includes the bf16 tail
        limit = 2e-2 if name.startswith("pooler") else 2e-3
        assert error == error and error < limit, (name, error)  # NaN fails: an unwritten output element


# ---------------------------------------------------------------- pooling from the next block's own first norm
def deep_tower(seed: int = 0, depth: int = 3):
    """tiny_tower with more blocks and non-trivial norm1 affines (gamma of both signs, beta off zero)."""
    torch.manual_seed(seed)
    tower = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=depth,
                              embed_dim=DIM, num_heads=HEADS, img_size=32).eval()
    with torch.no_grad():
        for param in list(tower.attn_pool.parameters()) + list(tower.norm.parameters()):
            param.normal_(0.0, 0.3)
        for block in tower.blocks:
            block.norm1.weight.uniform_(0.3, 1.5).mul_(torch.where(torch.rand(DIM) < 0.2, -1.0, 1.0))
            block.norm1.bias.normal_(0.0, 1.0)
    return tower


def test_entry_norm_folds_gamma_into_the_probe_and_keeps_beta():
    tower = deep_tower()
    folded = folded_head(tower)
    block = tower.blocks[1]
    entry = entry_norm(block, folded)[0]
    gamma, beta = block.norm1.weight.detach(), block.norm1.bias.detach()
    assert entry.module is block.norm1
    torch.testing.assert_close(entry.probe * gamma, folded.key_probe)
    assert torch.equal(entry.shift, beta)
    torch.testing.assert_close(entry.scale * gamma, torch.ones_like(gamma))
    tokens = tokens_like_a_block(seed=7).double()
    with torch.no_grad():   # (n - beta) . probe / gamma == x_hat . key_probe: the logits the kernel computes
        normed = torch.nn.functional.layer_norm(tokens, (DIM,), gamma.double(), beta.double(), block.norm1.eps)
        x_hat = torch.nn.functional.layer_norm(tokens, (DIM,), eps=folded.norm_eps)
    torch.testing.assert_close((normed - entry.shift.double()) @ entry.probe.double().T,
                               x_hat @ folded.key_probe.double().T)


def _break(case: str, tower) -> torch.nn.Module:
    block = tower.blocks[1]
    with torch.no_grad():
        if case == "eps":
            block.norm1.eps = 1e-5
        elif case == "zero_gamma":
            block.norm1.weight[3] = 0.0
        elif case == "beta_over_gamma":
            block.norm1.weight[3], block.norm1.bias[3] = 1e-4, 1.0
        elif case == "fp16_overflow":
            block.norm1.weight[3] = 1e4
        elif case == "no_affine":
            block.norm1 = torch.nn.LayerNorm(DIM, eps=1e-6, elementwise_affine=False)
        elif case == "post_norm_block":   # timm ResPostBlock applies norm1 after attention, not to its input
            from timm.models.vision_transformer import ResPostBlock
            return ResPostBlock(DIM, HEADS)
    return block


@pytest.mark.parametrize("case", ["eps", "zero_gamma", "beta_over_gamma", "fp16_overflow", "no_affine",
                                  "post_norm_block"])
def test_entry_norm_refuses_what_it_cannot_read_exactly(case):
    tower = deep_tower()
    assert entry_norm(tower.blocks[1], folded_head(tower))[0] is not None
    assert entry_norm(_break(case, tower), folded_head(tower))[0] is None


def test_an_entry_norm_is_rebuilt_when_its_weights_change_in_place():
    tower = deep_tower(seed=5)
    pooling = Pooling(tower.blocks, own_embedding=None)
    head = folded_head(tower)
    first = pooling.entry(1, head)[0]
    assert pooling.entry(1, head)[0] is first                                        # cached between calls
    with torch.no_grad():
        tower.blocks[1].norm1.weight.mul_(2.0)
    rebuilt = pooling.entry(1, head)[0]
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt.scale * 2.0, first.scale)


def _entry_pooler(tower):
    folded = folded_head(tower)
    return layer_pooler.LayerPooler(folded, [1]), entry_norm(tower.blocks[1], folded)[0]


def test_a_mismatched_or_missing_entry_norm_pools_the_block_output():
    tower = deep_tower(seed=2)
    tokens = tokens_like_a_block(seed=8)
    with torch.no_grad():
        expected = own_head(tower, tokens).unsqueeze(0)
        for call_entry in (True, False):   # the norm ran on another tensor / never ran
            pooler, entry = _entry_pooler(tower)
            pooler.hold(0, tokens)
            if call_entry:
                other = tokens.clone()
                pooler.add_entry(0, entry, other, tower.blocks[1].norm1(other))
            torch.testing.assert_close(pooler.result(), expected, rtol=1e-4, atol=1e-5)
            assert pooler.paths == {1: "pytorch"}   # CPU without the interpreter: PyTorch from the block output


def test_a_block_output_modified_in_place_before_its_norm_is_refused():
    tower = deep_tower(seed=2)
    tokens = tokens_like_a_block(seed=8)
    pooler, entry = _entry_pooler(tower)
    pooler.hold(0, tokens)
    tokens.add_(1.0)
    with pytest.raises(RuntimeError, match="in place"):
        pooler.add_entry(0, entry, tokens, tower.blocks[1].norm1(tokens))


ENTRY_CHECK = textwrap.dedent("""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_pooler import deep_tower, folded_head, own_head, tokens_like_a_block
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from siglip_dola import config
    from siglip_dola.readout import from_model, layer_pooler
    from siglip_dola.readout.entry_norm import ENTRY_BLOCK_TYPES, entry_norm
    errors, counts = {}, {}
    tower = deep_tower(seed=4)
    folded = folded_head(tower)
    layers = [tokens_like_a_block(2, 21, seed=s) for s in (30, 31, 32)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # fp32 tokens under autocast: fast path
        with config.override(target_programs=4):
            pooler = layer_pooler.LayerPooler(folded, [1, 2, 3])
        for slot in (0, 1):   # slots 0, 1 from block 2's / 3's first norm, slot 2 from its raw block output
            block = tower.blocks[slot + 1]
            pooler.hold(slot, layers[slot])
            pooler.add_entry(slot, entry_norm(block, folded)[0], layers[slot], block.norm1(layers[slot]))
        pooler.add(2, layers[2])
        z = pooler.result().float()
        expected = torch.stack([own_head(tower, t) for t in layers]).float()
    errors["pooler"] = float((z - expected).norm() / expected.norm())
    counts["pooler"] = pooler.paths
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                              num_attention_heads=4, image_size=32, patch_size=8)).eval()
    with torch.no_grad():
        for layer in [m for m in hf.modules() if type(m).__name__ == "SiglipEncoderLayer"]:   # 4.x and 5.x layouts
            layer.layer_norm1.weight.uniform_(0.3, 1.5); layer.layer_norm1.bias.normal_(0.0, 1.0)
    images = torch.randn(2, 3, 32, 32)
    for name, model in {"timm": tower, "hf": hf}.items():
        readout = from_model(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), config.override(target_programs=4):
            with config.override(fused_pooling=False):
                _, reference = readout(images, [1, 2])                  # the PyTorch folded path
                counts[name + "/off"] = readout.layer_paths
            _, z_layers = readout(images, [1, 2])
            counts[name] = readout.layer_paths
            with config.override(entry_norms=False):
                _, z_stats = readout(images, [1, 2])
                counts[name + "/stats"] = readout.layer_paths
            with torch.inference_mode():                                # no version counters (the scorer's mode)
                _, z_inference = readout(images, [1, 2])
                counts[name + "/inference_mode"] = readout.layer_paths
            last_block = [m for m in model.modules() if type(m).__name__ in ENTRY_BLOCK_TYPES][-1]
            boom = last_block.register_forward_hook(lambda *args: 1 / 0)   # a forward that raises mid-way
            try:
                readout(images, [1, 2])
            except ZeroDivisionError:
                pass
            boom.remove()
        errors[name] = float((z_layers.float() - reference.float()).norm() / reference.float().norm())
        errors[name + "/stats"] = float((z_stats.float() - reference.float()).norm() / reference.float().norm())
        errors[name + "/inference_mode"] = float((z_inference.float() - z_layers.float()).norm())
        counts[name + "/hooks_left"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    print(json.dumps({"errors": errors, "counts": counts}))
""")


def test_entry_norm_path_in_interpreter_matches_the_models_own_head():
    result = run_interpreted(ENTRY_CHECK)
    entry, stats, torch_path = ({"1": path, "2": path} for path in ("fused-entry-norm", "fused-stats", "pytorch"))
    assert result["counts"] == {"pooler": {**entry, "3": "fused-stats"},
                                **{f"{name}{tag}": paths for name in ("timm", "hf") for tag, paths in (
                                    ("", entry), ("/off", torch_path), ("/stats", stats), ("/inference_mode", entry),
                                    ("/hooks_left", 0))}}
    for name, error in result["errors"].items():
        assert error == error and error < 2e-2, (name, error)   # fp16 products; the tail runs in bf16 here


# ---------------------------------------------------------------- the path each layer takes
def trained_like_norms(model, seed: int = 1) -> None:
    """Every LayerNorm's affine set IN PLACE to trained-like values (gamma ~ N(0.8, 0.7), beta ~ N(0, 0.2))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.7 + 0.8)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)


def test_weights_changed_in_place_under_autocast_keep_the_folded_head():
    """The refold after an in-place change runs inside the caller's autocast; it must fold in fp32, pass its
    exactness check and keep every layer on the folded head, not the model's own."""
    from siglip_dola.readout import from_model
    tower = deep_tower(seed=6)
    readout = from_model(tower)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        readout(images, [1, 2])
        trained_like_norms(tower)
        _, z_layers = readout(images, [1, 2])
    assert readout.head_path == "folded" and readout.fallback_reason is None
    assert readout.layer_paths == {1: "pytorch", 2: "pytorch"}          # CPU without the interpreter
    with torch.no_grad():
        fp32 = torch.stack([own_head(tower, t) for t in _block_outputs(tower, images, [1, 2])])
    assert float((z_layers.float() - fp32).norm() / fp32.norm()) < 2e-2


def _block_outputs(tower, images, layers):
    outputs, handles = {}, [tower.blocks[j - 1].register_forward_hook(
        lambda m, a, o, j=j: outputs.__setitem__(j, o)) for j in layers]
    try:
        tower.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[j] for j in layers]


PATH_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_pooler import deep_tower, trained_like_norms
    from siglip_dola import config
    from siglip_dola.loading import from_model
    from siglip_dola.scorer import DoLaSigLIP
    tower = deep_tower(seed=7, depth=4)
    loaded = from_model(tower, logit_scale=4.6)
    scorer = DoLaSigLIP(loaded, mode="dynamic", layers=[1, 2, 3])
    images = torch.randn(2, 3, 32, 32)
    paths = {}
    with torch.autocast("cpu", dtype=torch.bfloat16), config.override(target_programs=4):
        scorer.embed(images)                    # the product path: inference mode, the scorer's own call
        paths["scorer"] = loaded.readout.layer_paths
        trained_like_norms(tower)               # a reload after first use, in place
        scorer.embed(images)
        paths["scorer_after_reload"] = loaded.readout.layer_paths
        paths["head_path"] = loaded.readout.head_path
    print(json.dumps(paths))
""")


def test_path_choice_in_interpreter_survives_the_scorer_and_an_in_place_reload():
    paths = run_interpreted(PATH_CHECK)
    entry = {str(layer): "fused-entry-norm" for layer in (1, 2, 3)}
    assert paths == {"scorer": entry, "scorer_after_reload": entry, "head_path": "folded"}
