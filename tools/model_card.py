"""MODEL_CARD.md of the embedded model: the data recipe and the card text, from metrics.json's content."""
from __future__ import annotations

import math

from siglip_dola.data import shapes


def data_recipe() -> dict:
    """The shapes dataset recipe as recorded in the model card."""
    return {"generator": "siglip_dola.data.shapes", "image_size": shapes.IMAGE_SIZE, "colours": list(shapes.COLOURS),
            "shapes": list(shapes.SHAPES), "sizes": list(shapes.SIZES), "backgrounds": list(shapes.BACKGROUNDS),
            "classes": len(shapes.CLASSNAMES), "held_out_of_train": sorted(shapes.HELD_OUT),
            "split_sizes": shapes.DEFAULT_SIZES, "seed": 0,
            "train_stream": "training reads train samples 0 .. steps*batch-1 (each seen once), beyond split_sizes['train']"}


def model_card(metrics: dict, table: str) -> str:
    """MODEL_CARD.md text from metrics.json's content and the results table (tools/embedded_report.py)."""
    train, zs, cfg = metrics["training"], metrics["zero_shot"], metrics["training"]["train_config"]
    layer_rows = "\n".join(f"| {j} | {value:.3f} |" for j, value in zs["layer_top1"].items())
    best_layer = max(zs["layer_top1"], key=lambda j: zs["layer_top1"][j])
    return MODEL_CARD_TEMPLATE.format(
        cfg=cfg, train=train, zs=zs, fin=zs["final_layer"], table=table, layer_rows=layer_rows,
        held_out=", ".join(metrics["data"]["held_out_of_train"]), minutes=train["train_seconds"] / 60,
        templates=" / ".join(f"`{t}`" for t in shapes.TEMPLATES), chance=1 / len(shapes.CLASSNAMES),
        train_images=cfg["steps"] * cfg["batch_size"], note=train.get("note", ""),
        scale_init=math.exp(cfg["logit_scale_init"]), shape_text_prob=cfg.get("shape_text_prob", 0.0),
        diagnosis=train.get("diagnosis", "none recorded"), best_layer=best_layer,
        best_layer_top1=zs["layer_top1"][best_layer])


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

## Zero-shot results (test split, n = {zs[n_test]}, of which {zs[n_test_held_out]} held-out-class images)
Text bank: 36 classnames x templates {templates}, averaged. tau = 1/exp(logit_scale) = {zs[tau]}.
`siglip-dola calibrate` chose the settings on VAL (n = {zs[n_val]}); `siglip-dola eval` measured them on TEST.
Regenerate: `{zs[command]}` (full result JSON: `{zs[results]}`).

{table}

Final layer: the predicted class has the right colour {fin[colour_correct]:.3f} and the right shape
{fin[shape_correct]:.3f} of the time (chance 1/6 each): the model reads colour, and shape only weakly.

Every layer read out through the final norm + MAP head on test (layer {cfg[vision_layers]} = final; the layer lens
of `eval`):

| layer | top-1 |
|---|---|
{layer_rows}

Best layer on test: {best_layer} ({best_layer_top1:.3f}); shown for insight only, nothing was chosen on test.

## Limitations
A toy model: 64x64 px synthetic shapes, a vocabulary of a few dozen words, a few minutes of CPU training.
Its accuracy says nothing about DoLa on real SigLIP ViT-L/16; it exists to exercise the real code paths
(loader, layer readout through the MAP head, DoLa scoring) offline. Numbers come from one training seed.

Shape is this model's weak point. Diagnosis (short proxy runs, val only): {diagnosis}
"""
