"""What the evaluation-throughput benchmark reads: an ImageFolder of synthetic ImageNet-sized JPEGs and a local
open_clip model folder (random init, random LayerNorm affines, an offline word-level tokenizer) that
`siglip_dola.load()` reads with no network (benchmarks/eval_throughput.py)."""
from __future__ import annotations

import json
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from norms import randomize_norms   # benchmarks/norms.py: trained-like LayerNorm affines

IMAGE_SIZE = (500, 375)  # (W, H), ImageNet's typical size
TEMPLATE = "a photo of a {}."


def _write_jpeg(job) -> None:
    """Smooth colour gradients + upsampled low-frequency texture + grain: compresses like a photo (~50 KB)."""
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.random(3) * (x[..., None] / width) * 200 + rng.random(3) * (y[..., None] / height) * 200
    texture = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = 0.6 * base + 0.4 * np.asarray(texture, np.float32) + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def write_image_folder(root: Path, n: int, classes: int) -> list[str]:
    """root/c000/00000.jpg ...: n JPEGs spread over `classes` folders; returns the class names."""
    names = [f"c{i:03d}" for i in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    jobs = [(root / names[i % classes] / f"{i:05d}.jpg", i) for i in range(n)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)
    return names


def _tokenizer(words: list[str], max_length: int):
    """A word-level HF tokenizer over `words` (ids far below the text tower's vocabulary size)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   model_max_length=max_length, model_input_names=["input_ids"])


def write_model_folder(folder: Path, name: str, classnames: list[str]) -> None:
    """A local open_clip folder: random-init `name` with random LayerNorm affines, SigLIP preprocessing."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    randomize_norms(model)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(name)
    preprocess_cfg = {**model.visual.preprocess_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                      "interpolation": "bicubic", "resize_mode": "squash"}  # the webli checkpoints' settings
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    words = TEMPLATE.replace(".", " . ").split() + classnames
    _tokenizer(words, model_cfg["text_cfg"].get("context_length", 64)).save_pretrained(folder)
