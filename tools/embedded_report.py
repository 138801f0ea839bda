"""Report for the embedded model: zero-shot top-1 of every layer and of DoLa on the shapes test split.

The DoLa bucket (dynamic) and premature layer (static) are chosen on VAL, never on test. Writes
``metrics.json`` and ``MODEL_CARD.md`` beside the checkpoint (``python -m tools.train_embedded --report-only``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from siglip_dola.data import shapes
from siglip_dola.io import write_json_atomic, write_text_atomic
from tools.train_embedded import class_text_embeds, pixels_from_images


@torch.no_grad()
def layer_logits(readout, class_embeds, samples, tau: float, batch_size: int = 256):
    """(final [n, C], layers [N-1, n, C]) zero-shot logits cos/tau of every layer, read out through norm + head."""
    from siglip_dola.scoring import build_log_probs_from_rep

    layers = list(range(1, readout.num_layers))
    finals, stacks = [], []
    for start in range(0, len(samples), batch_size):
        pixels = pixels_from_images([s.image for s in samples[start:start + batch_size]])
        z_final, z_layers = readout(pixels, layers)                          # [B, D], [J, B, D]
        finals.append(build_log_probs_from_rep(z_final, class_embeds, tau))  # log-softmax = logits - const
        stacks.append(build_log_probs_from_rep(z_layers, class_embeds, tau))
    return torch.cat(finals), torch.cat(stacks, dim=1)


def top1(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of [n, C] scores against [n] labels, over the rows where ``mask`` is True."""
    hits = (log_probs.argmax(dim=-1) == labels).float()
    return round((hits if mask is None else hits[mask]).mean().item(), 4)


def dola_top1(final, stacked, labels, layers, mode, static_layer=None, mask=None, alpha=0.1):
    """DoLa top-1 with candidate ``layers`` (rows of ``stacked`` are layers 1..N-1)."""
    from siglip_dola.scoring import dola

    rows = stacked[[layer - 1 for layer in layers]]                           # (J, n, C)
    result = dola(final, rows, layers, mode=mode, alpha=alpha, static_layer=static_layer)
    return top1(result.log_probs, labels, mask), result.premature_layer


def evaluate_checkpoint(out_dir, n_val: int | None = None, n_test: int | None = None, seed: int = 0) -> dict:
    """Zero-shot metrics of the checkpoint in ``out_dir``: every layer, DoLa bucket/static layer picked on VAL."""
    from transformers import AutoTokenizer, SiglipModel

    from siglip_dola.readout import from_model

    model = SiglipModel.from_pretrained(out_dir).eval()
    readout = from_model(model)
    class_embeds = class_text_embeds(model, AutoTokenizer.from_pretrained(out_dir))
    tau = 1.0 / model.logit_scale.exp().item()
    data = {}
    for split, n in (("val", n_val), ("test", n_test)):
        samples = shapes.make_split(split, n=n, seed=seed)
        labels = torch.tensor([s.label for s in samples])
        held_out = torch.tensor([shapes.CLASSNAMES[s.label] in shapes.HELD_OUT for s in samples])
        data[split] = (*layer_logits(readout, class_embeds, samples, tau), labels, held_out)
    num_layers = readout.num_layers
    buckets = _buckets(num_layers)
    static_candidates = sorted({layer for layers in buckets.values() for layer in layers})
    final, stacked, labels, _ = data["val"]
    val_dynamic = {b: dola_top1(final, stacked, labels, layers, "dynamic")[0] for b, layers in buckets.items()}
    val_static = {j: dola_top1(final, stacked, labels, [j], "static", j)[0] for j in static_candidates}
    best_bucket = max(val_dynamic, key=lambda b: (val_dynamic[b], -b))   # ties -> earlier bucket
    best_static = max(val_static, key=lambda j: (val_static[j], -j))
    return _test_metrics(data["test"], num_layers, buckets, best_bucket, best_static, val_dynamic, val_static,
                         tau, n_val=len(data["val"][2]))


def attribute_accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """How often the predicted class has the right colour / the right shape (36-way prediction)."""
    names = [name.split() for name in shapes.CLASSNAMES]
    predicted = [names[i] for i in log_probs.argmax(dim=-1).tolist()]
    truth = [names[i] for i in labels.tolist()]
    return {f"{attribute}_correct": round(sum(p[k] == t[k] for p, t in zip(predicted, truth)) / len(truth), 4)
            for k, attribute in enumerate(("colour", "shape"))}


def _buckets(num_layers: int) -> dict[int, list[int]]:
    """{bucket: even candidate layers} of 3 buckets, buckets without one left out (tiny test models): the
    enumeration calibrate's grid uses (siglip_dola.evaluation.calibrate.grid_points), not a copy of it."""
    from siglip_dola.evaluation.calibrate import CalibrationGrid, grid_points

    grid = CalibrationGrid(n_buckets=(3,), alphas=(0.1,), contrast_weights=(1.0,))
    return {p["bucket"]: p["layers"] for p in grid_points(grid, num_layers) if p["mode"] == "dynamic"}


def _test_metrics(test, num_layers, buckets, best_bucket, best_static, val_dynamic, val_static, tau, n_val):
    final, stacked, labels, held_out = test
    dynamic_top1, premature = dola_top1(final, stacked, labels, buckets[best_bucket], "dynamic")
    static_top1, _ = dola_top1(final, stacked, labels, [best_static], "static", best_static)
    layer_stack = torch.cat([stacked, final[None]])                                  # (N, n, C)
    return {
        "n_val": n_val, "n_test": len(labels), "n_test_held_out": int(held_out.sum()), "tau": round(tau, 5),
        "alpha": 0.1, "templates": shapes.TEMPLATES,
        "final_layer": {"top1": top1(final, labels), "top1_held_out": top1(final, labels, held_out),
                        "top1_seen": top1(final, labels, ~held_out), **attribute_accuracy(final, labels)},
        "layer_top1": {j + 1: top1(layer_stack[j], labels) for j in range(num_layers)},
        "layer_top1_held_out": {j + 1: top1(layer_stack[j], labels, held_out) for j in range(num_layers)},
        "dola_dynamic": {
            "bucket": best_bucket, "candidate_layers": buckets[best_bucket], "val_top1_by_bucket": val_dynamic,
            "top1": dynamic_top1, "top1_held_out": dola_top1(final, stacked, labels, buckets[best_bucket],
                                                             "dynamic", mask=held_out)[0],
            "premature_layer_counts": {int(k): int(v) for k, v in zip(*premature.unique(return_counts=True))}},
        "dola_static": {
            "layer": best_static, "val_top1_by_layer": val_static, "top1": static_top1,
            "top1_held_out": dola_top1(final, stacked, labels, [best_static], "static", best_static,
                                       mask=held_out)[0]},
        "dola_dynamic_test_by_bucket_not_used_for_selection": {
            b: dola_top1(final, stacked, labels, layers, "dynamic")[0] for b, layers in buckets.items()},
    }


def write_report(out_dir) -> dict:
    """Evaluate the checkpoint in ``out_dir``; write metrics.json and MODEL_CARD.md beside it; return the metrics."""
    out_dir = Path(out_dir)
    record = json.loads((out_dir / "training.json").read_text())
    metrics = {"training": record, "data": data_recipe(), "zero_shot": evaluate_checkpoint(out_dir)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "MODEL_CARD.md", model_card(metrics))
    return metrics


def data_recipe() -> dict:
    """The shapes dataset recipe as recorded in the model card."""
    return {"generator": "siglip_dola.data.shapes", "image_size": shapes.IMAGE_SIZE, "colours": list(shapes.COLOURS),
            "shapes": list(shapes.SHAPES), "sizes": list(shapes.SIZES), "backgrounds": list(shapes.BACKGROUNDS),
            "classes": len(shapes.CLASSNAMES), "held_out_of_train": sorted(shapes.HELD_OUT),
            "split_sizes": shapes.DEFAULT_SIZES, "seed": 0,
            "train_stream": "training reads train samples 0 .. steps*batch-1 (each seen once), beyond split_sizes['train']"}


def model_card(metrics: dict) -> str:
    """MODEL_CARD.md text from ``metrics``."""
    train, zs, cfg = metrics["training"], metrics["zero_shot"], metrics["training"]["train_config"]
    dyn, sta, fin = zs["dola_dynamic"], zs["dola_static"], zs["final_layer"]
    layer_rows = "\n".join(f"| {j} | {zs['layer_top1'][j]:.3f} | {zs['layer_top1_held_out'][j]:.3f} |"
                           for j in zs["layer_top1"])
    return MODEL_CARD_TEMPLATE.format(
        cfg=cfg, train=train, zs=zs, fin=fin, dyn=dyn, sta=sta, layer_rows=layer_rows,
        held_out=", ".join(metrics["data"]["held_out_of_train"]), minutes=train["train_seconds"] / 60,
        templates=" / ".join(f"`{t}`" for t in shapes.TEMPLATES), chance=1 / len(shapes.CLASSNAMES),
        train_images=cfg["steps"] * cfg["batch_size"], note=train.get("note", ""),
        scale_init=math.exp(cfg["logit_scale_init"]), shape_text_prob=cfg.get("shape_text_prob", 0.0),
        diagnosis=train.get("diagnosis", "none recorded"),
        best_layer=max(zs["layer_top1"], key=lambda j: zs["layer_top1"][j]),
        best_layer_top1=max(zs["layer_top1"].values()))


MODEL_CARD_TEMPLATE = """# Embedded default model: `siglip-dola` shapes SigLIP (tiny)

A small model with the real SigLIP architecture (Hugging Face `SiglipModel`), trained from scratch by this
repository on its own generated `shapes` dataset. It exists so that everything runs offline out of the box;
it knows nothing but coloured shapes. Switch to real weights with `--model google/siglip-large-patch16-384`.

## Architecture
- Vision: ViT, {cfg[vision_layers]} layers, width {cfg[hidden_size]}, {cfg[num_heads]} heads, MLP {cfg[mlp_ratio]}x,
  64x64 px input, patch {cfg[patch_size]} (64 tokens), MAP attention-pool head (`vision_use_head=True`).
- Text: transformer, {cfg[text_layers]} layers, width {cfg[hidden_size]}; word-level tokenizer over the dataset's words,
  padded to 16 tokens (SigLIP pools the last token).
- Loss: sigmoid loss with learned logit scale and bias (init scale {scale_init:.0f}, bias {cfg[logit_bias_init]}); every
  image-text pair whose text is true of the image (e.g. "a red circle." for any red circle) counts as positive.
- fp32 safetensors; loads with `SiglipModel` / `AutoImageProcessor` / `AutoTokenizer` `.from_pretrained(dir)`.

## Data (`siglip_dola.data.shapes`, deterministic from a seed)
6 colours x 6 shapes = 36 classes ("red triangle"), 2 sizes, 3 backgrounds, random position and small rotation,
64x64 px, drawn with PIL. Held out of train entirely (zero-shot): {held_out}.
Their words still occur in train captions through other combinations. Train texts: the caption
("a small red triangle on a gray background"), shorter forms, and the prompt templates. Share of extra
shape-only prompts ("a photo of a star.", `shape_text_prob`): {shape_text_prob}.
val and test contain all 36 classes and are generated with different per-sample seeds than train.

## Training
{cfg[steps]} steps x batch {cfg[batch_size]} = {train_images} train images, each seen once, AdamW lr {cfg[lr]} (warmup {cfg[warmup_steps]},
cosine), weight decay {cfg[weight_decay]}, seed {cfg[seed]}. Wall time {train[train_seconds]:.0f} s ({minutes:.1f} min) on
{train[machine]}. Reproduce: `{train[command]}`.
{note}

## Zero-shot results (test split, n = {zs[n_test]}, of which {zs[n_test_held_out]} held-out-class images; chance {chance:.3f})
Text bank: 36 classnames x templates {templates}, averaged. tau = 1/exp(logit_scale) = {zs[tau]}.
DoLa defaults: alpha = {zs[alpha]}; the dynamic bucket and the static layer were picked on VAL (n = {zs[n_val]}), never on test.

| method | top-1 | top-1 held-out classes |
|---|---|---|
| final layer (baseline) | {fin[top1]:.3f} | {fin[top1_held_out]:.3f} |
| DoLa dynamic, bucket {dyn[bucket]} (layers {dyn[candidate_layers]}) | {dyn[top1]:.3f} | {dyn[top1_held_out]:.3f} |
| DoLa static, layer {sta[layer]} | {sta[top1]:.3f} | {sta[top1_held_out]:.3f} |

Final layer: the predicted class has the right colour {fin[colour_correct]:.3f} and the right shape
{fin[shape_correct]:.3f} of the time (chance 1/6 each): the model reads colour, and shape only weakly.

Every layer read out through the final norm + MAP head (layer {cfg[vision_layers]} = final):

| layer | top-1 | top-1 held-out |
|---|---|---|
{layer_rows}

Best single layer on test: layer {best_layer} ({best_layer_top1:.3f}); shown for insight only, nothing was chosen on test.
Val top-1 used for selection: dynamic by bucket {dyn[val_top1_by_bucket]}; static by layer {sta[val_top1_by_layer]}.
Full numbers: `metrics.json`.

## Limitations
A toy model: 64x64 px synthetic shapes, a vocabulary of a few dozen words, a few minutes of CPU training.
Its accuracy says nothing about DoLa on real SigLIP ViT-L/16; it exists to exercise the real code paths
(loader, layer readout through the MAP head, DoLa scoring) offline. Numbers come from one training seed.

Shape is this model's weak point. Diagnosis (short proxy runs, val only): {diagnosis}
"""
