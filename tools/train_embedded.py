"""Train the embedded default model: a small HF ``SiglipModel`` on the generated ``shapes`` dataset.

    python -m tools.train_embedded --out DIR [--steps S] [--seed 0] [--no-report]

A fixed number of steps (not wall-clock), ``torch.manual_seed`` and per-sample seeded data make the run
reproducible; it uses 2 CPU threads by default (``--threads``). The output directory loads with ``SiglipModel.from_pretrained``,
``AutoImageProcessor.from_pretrained`` and ``AutoTokenizer.from_pretrained``, offline.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from siglip_dola.data import shapes
from siglip_dola.io import write_json_atomic

MAX_TEXT_LEN = 16
SPECIAL_TOKENS = {"<pad>": 0, "<unk>": 1, "</s>": 2}


@dataclass
class TrainConfig:
    """Model size and optimisation settings; the defaults produce the shipped checkpoint."""
    steps: int = 1200
    seed: int = 0
    batch_size: int = 64
    lr: float = 4e-4                    # 2e-3 stalled shape learning (val proxies: lower lr, better shape accuracy)
    weight_decay: float = 0.05
    warmup_steps: int = 50
    vision_layers: int = 24
    text_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    mlp_ratio: int = 2
    patch_size: int = 8
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -5.0       # SigLIP's -10 suits 32k batches; at batch 64 it stalls learning for hundreds of steps
    shape_text_prob: float = 0.0        # share of train texts that name only the shape ("a photo of a star.")


def _embedding(output):
    """transformers 4.x returns the embedding tensor, 5.x an output object holding it as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def build_tokenizer():
    """A word-level tokenizer over the dataset's words, padding to ``MAX_TEXT_LEN`` (SigLIP pools the last token)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {w for text in _vocabulary_texts() for w in text.replace(".", " . ").split()}
    vocab = dict(SPECIAL_TOKENS)
    for word in sorted(words):
        vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
        model_max_length=MAX_TEXT_LEN, padding_side="right", truncation_side="right",
        model_input_names=["input_ids"])   # like SigLIP's tokenizer: no attention mask, pads are attended


def _vocabulary_texts() -> list[str]:
    texts = list(shapes.TEMPLATES) + list(shapes.CLASSNAMES) + list(_CAPTION_FORMS)
    texts += list(shapes.SIZES) + list(shapes.BACKGROUNDS)
    return texts


def build_model_config(cfg: TrainConfig, vocab_size: int):
    """A ``SiglipConfig``: ViT with the MAP head at 64x64 px, text transformer of the same width."""
    from transformers import SiglipConfig

    common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_ratio * cfg.hidden_size,
                  num_attention_heads=cfg.num_heads)
    text = dict(common, vocab_size=vocab_size, num_hidden_layers=cfg.text_layers,
                max_position_embeddings=MAX_TEXT_LEN, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    vision = dict(common, num_hidden_layers=cfg.vision_layers, image_size=shapes.IMAGE_SIZE,
                  patch_size=cfg.patch_size, vision_use_head=True)
    return SiglipConfig(text_config=text, vision_config=vision)


def build_image_processor():
    """SigLIP's own image processor at the model's image size (rescale 1/255, normalise mean 0.5 std 0.5)."""
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE})


def pixels_from_images(images) -> torch.Tensor:
    """list[PIL.Image] -> [B, 3, H, W] float32, same math as ``build_image_processor`` (inputs are already 64x64)."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])   # (B, H, W, 3)
    array = (array / 255.0 - 0.5) / 0.5
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# Training texts: the full caption and shorter forms, so prompt templates like "a photo of a {}." are in distribution.
_CAPTION_FORMS = ("{caption}", "{caption}", "a {size} {colour} {shape}", "a {colour} {shape} on a {background} background")


def training_text(caption: str, rng: random.Random, shape_text_prob: float = 0.0) -> tuple[str, dict]:
    """A text for a train image and the attributes it asserts (used to mark every true pair as positive)."""
    facts = _facts(caption)
    colour, shape = facts["colour"], facts["shape"]
    if shape_text_prob and rng.random() < shape_text_prob:
        return rng.choice(shapes.TEMPLATES).format(shape), dict(shape=shape)
    if rng.random() < 0.4:
        classname = f"{colour} {shape}"
        return rng.choice(shapes.TEMPLATES).format(classname), dict(colour=colour, shape=shape)
    form = rng.choice(_CAPTION_FORMS)
    text = form.format(caption=caption, **facts)
    return text, {k: v for k, v in facts.items() if "{" + k + "}" in form or form == "{caption}"}


def positives_matrix(image_facts: list[dict], text_facts: list[dict]) -> torch.Tensor:
    """[B_img, B_txt] 1.0 where the text's asserted attributes all hold for the image, else 0.0."""
    rows = [[float(all(img[k] == v for k, v in txt.items())) for txt in text_facts] for img in image_facts]
    return torch.tensor(rows)


def sigmoid_loss(image_embeds, text_embeds, logit_scale, logit_bias, positives) -> torch.Tensor:
    """SigLIP's sigmoid loss with multiple positives: image_embeds [B, D], text_embeds [B, D], positives [B, B]."""
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = image_embeds @ text_embeds.T * logit_scale.exp() + logit_bias   # (B_img, B_txt)
    signs = 2.0 * positives - 1.0
    return -F.logsigmoid(signs * logits).sum(dim=-1).mean()


def make_batch(step: int, cfg: TrainConfig, tokenizer):
    """Images [B,3,H,W], input_ids [B,L], positives [B,B] for ``step`` (train samples step*B .. step*B+B-1)."""
    rng = random.Random(f"text/{cfg.seed}/{step}")
    samples = [shapes.make_sample("train", step * cfg.batch_size + k, cfg.seed) for k in range(cfg.batch_size)]
    texts, text_facts = zip(*(training_text(s.caption, rng, cfg.shape_text_prob) for s in samples))
    image_facts = [_facts(s.caption) for s in samples]
    ids = tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    return pixels_from_images([s.image for s in samples]), ids, positives_matrix(image_facts, list(text_facts))


def _facts(caption: str) -> dict:
    _, size, colour, shape, _, _, background, _ = caption.split()
    return dict(size=size, colour=colour, shape=shape, background=background)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, log_every: int = 50):
    """Train from scratch; return (model, tokenizer, seconds). Deterministic for a given ``cfg`` and thread count."""
    from transformers import SiglipModel

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = SiglipModel(build_model_config(cfg, vocab_size=len(tokenizer)))
    with torch.no_grad():
        model.logit_scale.fill_(cfg.logit_scale_init)
        model.logit_bias.fill_(cfg.logit_bias_init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        pixels, input_ids, positives = make_batch(step, cfg, tokenizer)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        image_embeds = _embedding(model.get_image_features(pixel_values=pixels))
        text_embeds = _embedding(model.get_text_features(input_ids=input_ids))
        loss = sigmoid_loss(image_embeds, text_embeds, model.logit_scale, model.logit_bias, positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:7.1f}s", flush=True)
    model.eval()
    return model, tokenizer, time.perf_counter() - start


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, split: str = "val", n: int = 360, seed: int = 0) -> float:
    """Final-layer zero-shot top-1 on ``split`` (classnames x TEMPLATES, averaged text embeddings)."""
    samples = shapes.make_split(split, n=n, seed=seed)
    class_embeds = class_text_embeds(model, tokenizer)                                  # (C, D)
    image_embeds = F.normalize(_embedding(model.get_image_features(
        pixel_values=pixels_from_images([s.image for s in samples]))), dim=-1)   # (n, D)
    predictions = (image_embeds @ class_embeds.T).argmax(dim=-1)
    labels = torch.tensor([s.label for s in samples])
    return (predictions == labels).float().mean().item()


@torch.no_grad()
def class_text_embeds(model, tokenizer) -> torch.Tensor:
    """[C, D] L2-normalised class embeddings: mean over TEMPLATES of normalised text embeddings."""
    texts = [t.format(c) for c in shapes.CLASSNAMES for t in shapes.TEMPLATES]
    ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    embeds = F.normalize(_embedding(model.get_text_features(input_ids=ids)), dim=-1)
    embeds = embeds.view(len(shapes.CLASSNAMES), len(shapes.TEMPLATES), -1).mean(dim=1)   # (C, D)
    return F.normalize(embeds, dim=-1)


def save(model, tokenizer, out_dir) -> Path:
    """Write the fp32 model (safetensors, ~4 MB), tokenizer and preprocessor config into ``out_dir``, file by file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save.") as tmp:
        model.float().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        build_image_processor().save_pretrained(tmp)
        _portable_tokenizer_class(Path(tmp) / "tokenizer_config.json")
        for path in Path(tmp).iterdir():
            os.replace(path, out_dir / path.name)
    return out_dir


def _portable_tokenizer_class(config_path: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; both resolve PreTrainedTokenizerFast.
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def machine_description() -> str:
    """One line naming the CPU, core count and torch thread count used for training."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads), {platform.system()}"


def write_training_record(out_dir, cfg: TrainConfig, seconds: float, machine: str, **notes: str) -> None:
    """training.json beside the checkpoint: the settings, the wall time, the machine and free-text ``notes``."""
    write_json_atomic(Path(out_dir) / "training.json", {**notes,
        "train_config": asdict(cfg), "train_seconds": round(seconds, 1), "machine": machine,
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": f"python -m tools.train_embedded --out DIR --steps {cfg.steps} --seed {cfg.seed} "
                   f"--lr {cfg.lr} --threads {torch.get_num_threads()}"})


def main(argv=None) -> int:
    """CLI: train, save, and (unless --no-report) write MODEL_CARD.md and metrics.json beside the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2; on a CPU shared with other jobs 1 can be much faster)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak AdamW learning rate")
    parser.add_argument("--vision-layers", type=int, default=TrainConfig.vision_layers)
    parser.add_argument("--note", default="", help="free text for training.json and the model card (e.g. the load)")
    parser.add_argument("--diagnosis", default="", help="free text: what was tried on val before this recipe")
    parser.add_argument("--no-report", action="store_true", help="skip the report (calibrate on val, eval on test: MODEL_CARD.md, metrics.json, results_test.json)")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report for the checkpoint in --out, with its calibration.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        cfg = TrainConfig(steps=args.steps, seed=args.seed, lr=args.lr, vision_layers=args.vision_layers)
        model, tokenizer, seconds = train(cfg)
        print(f"trained {cfg.steps} steps in {seconds:.0f}s; val top-1 {zero_shot_accuracy(model, tokenizer):.3f}")
        save(model, tokenizer, args.out)
        notes = {k: v for k, v in (("note", args.note), ("diagnosis", args.diagnosis)) if v}
        write_training_record(args.out, cfg, seconds, machine_description(), **notes)
    if not args.no_report:
        from tools.embedded_report import write_report  # one direction: the report never imports training code

        _, table = write_report(args.out, calibrate_first=not args.report_only)
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
