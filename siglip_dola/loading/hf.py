"""Hugging Face transformers SigLIP (`SiglipModel`): local save_pretrained folders, Hub ids, loaded objects."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from siglip_dola.loading import hub
from siglip_dola.loading.parts import AdapterParts

HUB_FILES = [
    "config.json", "model-*.safetensors",
    "preprocessor_config.json", "processor_config.json", "tokenizer*", "special_tokens_map.json",
    "spiece.model", "*.model",
]
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json"]
SUPPORTED_MODEL_TYPES = ("siglip",)


def is_hf_dir(folder: Path) -> bool:
    """True when `folder` holds an HF config.json (the save_pretrained layout)."""
    return (folder / "config.json").is_file()


def is_model(model) -> bool:
    """True for a transformers SiglipModel (vision + text towers)."""
    from transformers import SiglipModel

    return isinstance(model, SiglipModel)


def load_dir(folder: Path):
    """(model, preprocess, tokenizer) from a local HF folder; safetensors weights only, no network."""
    _check_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{folder} has no model.safetensors: only safetensors weights are loaded (nothing is unpickled)"
        )
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    with _quiet_transformers():
        model = SiglipModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, processor, tokenizer


@contextmanager
def _quiet_transformers():
    """Silence transformers' load-time chatter for one load, then restore its verbosity and progress bars.

    Every SigLIP load warns about the default text config's CLIP bos/eos ids and draws a per-tensor
    progress bar; neither says anything about the user's checkpoint.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hub(repo_id: str):
    """(model, preprocess, tokenizer, snapshot folder) for a Hub id such as google/siglip-large-patch16-384."""
    folder = hub.snapshot(repo_id, HUB_FILES, WEIGHT_FILES)
    return (*load_dir(folder), folder)


def _check_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{folder}/config.json has model_type={model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)} "
            "(fixed-resolution SigLIP / SigLIP 2 checkpoints; NaFlex 'siglip2' models are not supported)"
        )


def parts(model, preprocess=None, tokenizer=None) -> AdapterParts:
    """Preprocess / text encoder / logit scale and bias of a SiglipModel."""
    if tokenizer is None:
        raise TypeError("from_model(SiglipModel) needs tokenizer= (e.g. AutoTokenizer.from_pretrained(...))")
    return AdapterParts(
        preprocess=_wrap_processor(preprocess, model),
        encode_text=_text_encoder(model, tokenizer),
        logit_scale=float(model.logit_scale.detach().float().reshape(-1)[0]),
        logit_bias=float(model.logit_bias.detach().float().reshape(-1)[0]),
    )


def _wrap_processor(processor, model):
    """PIL -> [3, H, W]: an HF image processor is wrapped; a plain callable is used as is."""
    if processor is None:
        from transformers import SiglipImageProcessor

        size = model.config.vision_config.image_size
        processor = SiglipImageProcessor(size={"height": size, "width": size})
    if not hasattr(processor, "preprocess"):
        return processor
    return HFImagePreprocess(processor)


class HFImagePreprocess:
    """PIL -> [3, H, W] through an HF image processor; its repr names the settings (index manifests record it)."""

    SETTINGS = ("size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        # PIL is height x width x channels: say so, or a 1- or 3-pixel-high image is read as channels-first
        return self.processor(images=image.convert("RGB"), return_tensors="pt",
                              input_data_format="channels_last")["pixel_values"][0]

    def __repr__(self) -> str:
        config = self.processor.to_dict()
        settings = ", ".join(f"{key}={config[key]!r}" for key in self.SETTINGS if key in config)
        return f"{type(self.processor).__name__}({settings})"


def _text_encoder(model, tokenizer):
    max_length = model.config.text_config.max_position_embeddings

    def encode(texts: list[str]) -> torch.Tensor:
        # SigLIP was trained on max_length padding; the text model takes no attention mask.
        tokens = tokenizer(list(texts), padding="max_length", max_length=max_length,
                           truncation=True, return_tensors="pt")
        input_ids = tokens["input_ids"].to(model.logit_scale.device)
        output = model.get_text_features(input_ids=input_ids)
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # (C, D)

    return encode
