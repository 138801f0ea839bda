"""GPU correctness at real ViT-L/16-384 size: the readout and scorer on CUDA against the models' own modules.

    python benchmarks/gpu_check.py --out gpu_check.json

Random-init open_clip ViT-L-16-SigLIP-384 and HF SiglipVisionModel (ViT-L/16-384), batch 8, all 23 layers:
- fp32 on CUDA: z_final vs the model's own embedding, z_j vs the model's own norm + head applied to the
  block outputs of the same forward (collected here by plain hooks), as relative max errors;
- bf16 autocast on CUDA (fused Triton readout where available): z vs the fp32 reference, and whether the
  DoLa top-1 and premature layer agree with fp32; how many layers were read from the next block's first norm
  (entry_norm.EntryNorm) and how far they are from the same layers read from the raw block outputs;
  every LayerNorm gets a random affine first (random init leaves gamma = 1, beta = 0);
- readout.cuda_graphs (CUDA graph replay) against the plain calls, fp32 and bf16, and the model left unchanged;
- a 12-head tower (ViT-B-16-SigLIP; the kernel pads heads to 16): fused bf16 layers vs the PyTorch path;
- CLIP-family and NaFlex towers (token_head.py), the same checks: open_clip ViT-L-14-336 and HF
  CLIPVisionModelWithProjection at ViT-L/14-336 (class token, ln_post, proj), open_clip CoCa ViT-B-32
  (attention pool), open_clip EVA02-B-16 (timm Eva trunk, class token), HF Siglip2VisionModel base NaFlex (two patch grids with padding in one batch, packed
  images; its CUDA-graph row says whether the call could be captured).
``--only clip`` runs just the CLIP-family rows; ``--device cpu`` smoke-tests the script (slow at these sizes).
Prints and writes one JSON object. Nothing here is asserted; the tests do that on CPU.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchenv import environment
from norms import randomize_norms   # benchmarks/norms.py: trained-like LayerNorm affines


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def own_layers(model, blocks, norm_head, images, layers):
    """The model's own norm + head applied to block outputs of one plain forward (reference)."""
    outputs, handles = {}, []
    for j in layers:
        handles.append(blocks[j - 1].register_forward_hook(lambda m, a, o, j=j: outputs.__setitem__(j, o[0] if isinstance(o, tuple) else o)))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([norm_head(outputs[j]) for j in layers])


def _counting_entry_slots(readout, images, layers):
    """readout(images, layers) plus how many layers it read from the next block's first norm (its path record)."""
    z_final, z_layers = readout(images, layers)
    return z_final, z_layers, sum(path == "fused-entry-norm" for path in readout.layer_paths.values())


def check(name, model, blocks, norm_head, own_embed, images, layers, bank, tau):
    from siglip_dola import config, scoring
    from siglip_dola.readout import from_model

    readout = from_model(model)
    with torch.no_grad():
        z_final, z_layers = readout(images, layers)
        row = {"model": name, "head_path": readout.head_path,
               "fp32_final_rel_err": rel(z_final, own_embed(images)),
               "fp32_layers_rel_err": rel(z_layers, own_layers(own_embed, blocks, norm_head, images, layers))}
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            b_final, b_layers = readout(images, layers)                       # the default paths for this batch
            row["bf16_layer_paths"] = sorted(set(readout.layer_paths.values()))
            with config.override(stacked_max_batch=0):   # one by one: from the next block's norm where exact
                _, entry_layers, entry_slots = _counting_entry_slots(readout, images, layers)
                with config.override(entry_norms=False):   # the same layers from the raw block outputs (stats)
                    _, stats_layers = readout(images, layers)
            with config.override(stacked_max_batch=images.shape[0]):   # every layer in one stacked launch
                _, stacked_layers = readout(images, layers)
                row["bf16_stacked_paths"] = sorted(set(readout.layer_paths.values()))
    row["bf16_entry_norm_slots"] = entry_slots
    row["bf16_entry_vs_stats_layers_rel_err"] = rel(entry_layers, stats_layers)
    row["bf16_stacked_vs_stats_layers_rel_err"] = rel(stacked_layers, stats_layers)
    row["bf16_vs_fp32_final_rel_err"] = rel(b_final, z_final)
    row["bf16_vs_fp32_layers_rel_err"] = rel(b_layers, z_layers)
    ref = scoring.score(z_final, z_layers, bank, tau, layers)
    got = scoring.score(b_final.float(), b_layers.float(), bank, tau, layers)
    row["bf16_top1_agreement"] = float((ref.probs.argmax(-1) == got.probs.argmax(-1)).float().mean())
    row["bf16_premature_layer_agreement"] = float((ref.premature_layer == got.premature_layer).float().mean())
    if images.is_cuda:
        try:
            row.update(graphed_rows(model, readout, images, layers))
        except (RuntimeError, ValueError) as error:   # NaFlex: refused before capture (check_capturable)
            row["graphed"] = f"not capturable: {str(error)[:200]}"
    return row


def graphed_rows(model, readout, images, layers) -> dict:
    """readout.cuda_graphs: replays equal the plain calls (fp32 and bf16 autocast, new images each replay),
    and the model is left as it was (weights, hooks)."""
    from siglip_dola import config
    from siglip_dola.readout import cuda_graphs

    before = {k: v.clone() for k, v in model.state_dict().items()}
    row, other = {}, torch.randn_like(images)
    if readout.packed_inputs:   # NaFlex: new patches, the same grids in row 0 (random ones are no grid at all)
        other[:, 0] = images[:, 0]
    # the plain calls take the pooling a capture takes (stacking has its own batch limit there): they must be equal
    for tag, autocast in (("fp32", False), ("bf16", True)):
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            call = cuda_graphs.capture(readout, other, layers)     # captured on other images
            replayed = call(images)                            # replayed on these
            with config.override(stacked_max_batch=config.get("stacked_max_batch_graphed")):
                plain = readout(images, layers)
                plain_other = readout(other, layers)
            replayed_other = call(other)
        row[f"graphed_{tag}_max_abs_diff"] = max(float((a.float() - b.float()).abs().max())
                                                 for a, b in zip(replayed + replayed_other, plain + plain_other))
    row["graphed_model_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return row


def twelve_heads_row(device) -> dict:
    """open_clip ViT-B-16-SigLIP (12 heads: padded to 16 in the kernel), bf16: fused vs the PyTorch path, all layers."""
    import open_clip
    from siglip_dola import config
    from siglip_dola.readout import from_model

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).to(device).eval()
    randomize_norms(model)
    readout = from_model(model)
    images = torch.randn(4, 3, *readout.image_size, device=device)
    layers = list(range(1, readout.num_layers))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        _, fast, entry_slots = _counting_entry_slots(readout, images, layers)
        with config.override(fused_pooling=False):
            _, reference = readout(images, layers)
    return {"model": "open_clip ViT-B-16-SigLIP (12 heads), bf16, batch 4", "bf16_entry_norm_slots": entry_slots,
            "bf16_fused_vs_pytorch_layers_rel_err": rel(fast, reference)}


def scorer_graphs_row(device) -> dict:
    """DoLaSigLIP(cuda_graphs=True) vs the plain scorer on the embedded model, bf16, uneven last batch (4, 4, 2)."""
    import siglip_dola

    model = siglip_dola.load(device=device, precision="bf16")
    bank = siglip_dola.build_text_bank(model, ["red circle", "blue square", "green triangle"], templates=["a {}"])
    pixels = torch.rand(10, 3, *model.readout.image_size, generator=torch.Generator().manual_seed(3))
    plain = siglip_dola.DoLaSigLIP(model, batch_size=4).classify(pixels, bank, top_k=3)
    graphs = siglip_dola.DoLaSigLIP(model, batch_size=4, cuda_graphs=True)
    first, again = graphs.classify(pixels, bank, top_k=3), graphs.classify(pixels, bank, top_k=3)
    diff = max(abs(p["score"] - g["score"]) for a, b in zip(plain, first + again)
               for p, g in zip(a["predictions"], b["predictions"]))
    return {"model": "embedded, DoLaSigLIP(cuda_graphs=True) vs plain, bf16, batches 4+4+2",
            "scorer_graphs_max_score_diff": diff, "graphs_captured": len(graphs._graphed_scores),
            "same_predictions": all(a["predictions"][0]["label"] == b["predictions"][0]["label"]
                                    and a["premature_layer"] == b["premature_layer"]
                                    for a, b in zip(plain + plain, first + again))}


def clip_family_rows(device, batch: int) -> list[dict]:
    """open_clip ViT-L-14-336, HF CLIP ViT-L/14-336, open_clip CoCa ViT-B-32, HF Siglip2 NaFlex base: check() rows.

    Each layer reference is the model's own head logic written out on the block output (hooks in own_layers)."""
    import open_clip
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, Siglip2VisionConfig,
                              Siglip2VisionModel)
    from siglip_dola.readout.tower_hf_siglip2 import pack, unpack

    rows = []
    for name, size, pool in (("ViT-L-14-336", 336, "token"), ("coca_ViT-B-32", 224, "coca"),
                             ("EVA02-B-16", 224, "eva")):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None).to(device).eval()
        randomize_norms(model)
        visual = model.visual
        if pool == "token":
            head = lambda h, v=visual: v.ln_post(h)[:, 0] @ v.proj                     # noqa: E731
            blocks = visual.transformer.resblocks
        elif pool == "coca":
            head = lambda h, v=visual: v.ln_post(v.attn_pool(h))[:, 0] @ v.proj       # noqa: E731
            blocks = visual.transformer.resblocks
        else:   # timm Eva trunk: norm, class token, fc_norm, the trunk's head, open_clip's head
            head = lambda h, v=visual, t=visual.trunk: v.head(t.head(t.fc_norm(t.norm(h)[:, 0])))  # noqa: E731
            blocks = visual.trunk.blocks
        layers = list(range(1, len(blocks)))
        images = torch.randn(batch, 3, size, size, device=device)
        embed = lambda x, m=model: m.encode_image(x, normalize=False)                 # noqa: E731
        with torch.no_grad():
            bank = torch.randn(1000, int(embed(images[:1]).shape[-1]), device=device)
        rows.append(check(f"open_clip {name}", model, blocks, head, embed, images, layers, bank, 0.01))
        del model
    torch.manual_seed(0)
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768)).to(device).eval()
    randomize_norms(hf)
    vm = hf.vision_model
    rows.append(check("HF CLIPVisionModelWithProjection ViT-L/14-336", hf, vm.encoder.layers,
                      lambda h, m=hf: m.visual_projection(vm.post_layernorm(h[:, 0])),
                      lambda x, m=hf: m(pixel_values=x).image_embeds, torch.randn(batch, 3, 336, 336, device=device),
                      list(range(1, 24)), torch.randn(1000, 768, device=device), 0.01))
    del hf
    torch.manual_seed(0)
    s2 = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, patch_size=16, num_patches=256)).to(device).eval()
    randomize_norms(s2)
    grids = torch.tensor([(12, 20), (8, 14)] * (max(batch, 2) // 2), device=device)   # 240 and 112 of 256 patches
    packed = pack(torch.randn(len(grids), 256, 768, device=device), grids)
    mask = unpack(packed)["pixel_attention_mask"]
    vs = getattr(s2, "vision_model", s2)
    rows.append(check("HF Siglip2VisionModel base NaFlex (packed, padded)", s2, vs.encoder.layers,
                      lambda h: vs.head(vs.post_layernorm(h), mask),
                      lambda x: s2(**unpack(x)).pooler_output, packed, list(range(1, 12)),
                      torch.randn(1000, 768, device=device), 0.01))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cuda (the point); cpu only to smoke-test this script")
    parser.add_argument("--only", choices=["all", "siglip", "clip"], default="all",
                        help="siglip: the SigLIP rows; clip: the CLIP-family / NaFlex rows; all: both")
    args = parser.parse_args()
    device, layers = torch.device(args.device), list(range(1, 24))
    rows = siglip_rows(device, args.batch, layers) if args.only in ("all", "siglip") else []
    if args.only in ("all", "clip"):
        rows += clip_family_rows(device, args.batch)
    rows.append(pixel_split_row(device))
    result = {**environment(device), "rows": rows}   # commit, versions, GPU, command
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def pixel_split_row(device) -> dict:
    """data/pixel_split.py on the device: uint8 pixels finished there vs open_clip's whole preprocess on the CPU."""
    import numpy as np
    import open_clip
    from PIL import Image
    from siglip_dola.data.pixel_split import split_preprocess

    preprocess = open_clip.image_transform(384, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    split = split_preprocess(preprocess)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(16)]
    on_device = split.finish(torch.stack([split.on_host(image) for image in images]).to(device)).cpu()
    expected = torch.stack([preprocess(image) for image in images])
    return {"model": "pixel split (uint8 to the device, /255 and Normalize there) vs the whole preprocess on CPU",
            "pixel_split_equal": bool(torch.equal(on_device, expected)),
            "pixel_split_max_abs_diff": float((on_device - expected).abs().max())}


def siglip_rows(device, batch: int, layers: list[int]) -> list[dict]:
    """The SigLIP rows: open_clip and HF ViT-L/16-384, the 12-head tower, the scorer's CUDA graphs."""
    import open_clip
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    images = torch.randn(batch, 3, 384, 384, device=device)
    bank = torch.randn(1000, 1024, device=device)
    clip = open_clip.create_model("ViT-L-16-SigLIP-384", pretrained=None).to(device).eval()
    randomize_norms(clip)
    trunk = clip.visual.trunk
    rows = [check("open_clip ViT-L-16-SigLIP-384", clip, trunk.blocks,
                  lambda h: clip.visual.head(trunk.forward_head(trunk.norm(h))), clip.encode_image, images, layers,
                  bank, 0.01)]
    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=384, patch_size=16)).to(device).eval()
    randomize_norms(hf)
    vm = getattr(hf, "vision_model", hf)  # transformers 4.x nests the transformer, 5.x does not
    rows.append(check("HF SiglipVisionModel ViT-L/16-384", hf, vm.encoder.layers, lambda h: vm.head(vm.post_layernorm(h)),
                      lambda x: hf(pixel_values=x).pooler_output, images, layers, bank, 0.01))
    if device.type == "cuda":
        rows.append(twelve_heads_row(device))
        rows.append(scorer_graphs_row(device))
    return rows


if __name__ == "__main__":
    main()
