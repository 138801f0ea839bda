"""open_clip SigLIP, CLIP and CoCa: `NAME:TAG` (e.g. `ViT-L-14-336:openai`), `hf-hub:org/repo`, `NAME:/path/ckpt.safetensors`, local folders, loaded objects.

open_clip loads checkpoints with `torch.load(weights_only=True)` (we pass it explicitly) or safetensors.
Hub files are located through `hub.snapshot` first, so open_clip itself only ever sees local paths.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from siglip_dola.loading import hub
from siglip_dola.loading.parts import WEIGHT_SUFFIXES, AdapterParts, Loaded, weight_files

WEIGHT_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "*.model", "vocab*", "merges.txt"]


def is_model(model) -> bool:
    """True for an open_clip CLIP / CustomTextCLIP / CoCa model."""
    if "open_clip" not in sys.modules:  # an open_clip model exists only once open_clip was imported (~2 s)
        return False
    import open_clip

    return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa))


def is_open_clip_dir(folder: Path) -> bool:
    """True when `folder` holds open_clip_config.json (open_clip's local-dir / Hub layout)."""
    return (folder / "open_clip_config.json").is_file()


def known_names() -> list[str]:
    """Built-in open_clip architecture names (e.g. ViT-L-16-SigLIP-384)."""
    import open_clip

    return open_clip.list_models()


def is_name(name: str) -> bool:
    """`hf-hub:org/repo`, or a built-in architecture name with an optional `:TAG` / `:/path/to/checkpoint`."""
    arch = name.partition(":")[0]
    return name.startswith("hf-hub:") or ("/" not in arch and arch in known_names())  # 'org/name' is HF's, unimported


def load_name(name: str) -> Loaded:
    """`hf-hub:org/repo`, `NAME:TAG`, `NAME:/path/to/weights.safetensors`, or `NAME` when it has one tag."""
    if name.startswith("hf-hub:"):
        model, preprocess, tokenizer, folder = load_hub(name[len("hf-hub:"):])
        return Loaded(model, preprocess, tokenizer, name, weight_files(folder))
    import open_clip

    arch, _, tag = name.partition(":")
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if len(tags) != 1:
            raise ValueError(f"open_clip model {arch!r} needs a pretrained tag or checkpoint: "
                             f"'{arch}:TAG' with TAG in {tags}, or '{arch}:/path/to/weights.safetensors'")
        tag = tags[0]
    checkpoint = Path(tag).expanduser()
    if checkpoint.is_file():
        checkpoint = checkpoint.resolve()
        return Loaded(*load_checkpoint(arch, checkpoint), f"{arch}:{checkpoint}", [checkpoint])
    if "/" in tag or tag.endswith(WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    model, preprocess, tokenizer, folder = load_tag(arch, tag)
    return Loaded(model, preprocess, tokenizer, f"{arch}:{tag}", weight_files(folder))


def load_folder(folder: Path) -> Loaded:
    return Loaded(*load_dir(folder), str(folder), weight_files(folder))


def load_dir(folder: Path):
    """(model, preprocess, tokenizer) from a folder with open_clip_config.json and a checkpoint."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", weights_only=True)
    text_cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]["text_cfg"]
    return model, preprocess, _tokenizer(text_cfg, folder)


def load_hub(repo_id: str):
    """(model, preprocess, tokenizer, snapshot folder) for `hf-hub:org/repo` (open_clip layout on the Hub)."""
    folder = hub.snapshot(repo_id, ["open_clip_config.json", *TOKENIZER_FILES], WEIGHT_FILES)
    return (*load_dir(folder), folder)


def load_tag(name: str, tag: str):
    """(model, preprocess, tokenizer, weights folder) for a built-in name + pretrained tag (`NAME:webli`)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ValueError(f"unknown pretrained tag {tag!r} for open_clip model {name!r}; valid tags: {tags}")
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
    repo_id = (pretrained_cfg.get("hf_hub") or "").strip("/")
    if not repo_id:
        raise ValueError(f"open_clip tag {name}:{tag} is not hosted on the Hugging Face Hub; "
                         "download its checkpoint and pass 'NAME:/path/to/checkpoint' instead")
    folder = hub.snapshot(repo_id, [], WEIGHT_FILES)
    checkpoint = next(folder / f for f in WEIGHT_FILES if (folder / f).is_file())
    return (*load_checkpoint(name, checkpoint, pretrained_cfg), folder)


def load_checkpoint(name: str, checkpoint: Path, pretrained_cfg: dict | None = None):
    """(model, preprocess, tokenizer) for a built-in architecture + a local checkpoint file."""
    import open_clip

    if checkpoint.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"checkpoint {checkpoint} must end with one of {WEIGHT_SUFFIXES}")
    pretrained_cfg = pretrained_cfg or _default_pretrained_cfg(name)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(checkpoint), weights_only=True,
        image_mean=pretrained_cfg.get("mean"), image_std=pretrained_cfg.get("std"),
        image_interpolation=pretrained_cfg.get("interpolation"),
        image_resize_mode=pretrained_cfg.get("resize_mode"),
    )
    return model, preprocess, _tokenizer(open_clip.get_model_config(name)["text_cfg"], None)


def _default_pretrained_cfg(name: str) -> dict:
    """Preprocessing of the architecture's first pretrained tag (SigLIP: mean = std = 0.5), else {}."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    return open_clip.get_pretrained_cfg(name, tags[0]) if tags else {}


def _tokenizer(text_cfg: dict, folder: Path | None):
    """open_clip tokenizer; an HF tokenizer is read from `folder` or the Hub cache, never fetched blindly."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    context_length = text_cfg.get("context_length", 77)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return open_clip.SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    source = folder if folder is not None and (folder / "tokenizer_config.json").is_file() else None
    if source is None:
        source = hub.snapshot(hf_name, TOKENIZER_FILES, ["tokenizer_config.json"])  # no weights here
    return HFTokenizer(str(source), context_length=context_length,
                       tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))


def parts(model, preprocess=None, tokenizer=None) -> AdapterParts:
    """Preprocess / text encoder / logit scale and bias of an open_clip model."""
    if preprocess is None:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    bias = getattr(model, "logit_bias", None)
    return AdapterParts(
        preprocess=preprocess,
        encode_text=None if tokenizer is None else _text_encoder(model, tokenizer),
        logit_scale=float(model.logit_scale.detach().float().reshape(-1)[0]),
        logit_bias=0.0 if bias is None else float(bias.detach().float().reshape(-1)[0]),
    )


def _text_encoder(model, tokenizer):
    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(list(texts)).to(model.logit_scale.device)
        return model.encode_text(tokens, normalize=False)  # (C, D), raw (CoCa normalises by default)

    return encode
