"""Hugging Face transformers SigLIP, CLIP and SigLIP2 NaFlex (`SiglipModel`, `CLIPModel`, `Siglip2Model`):
local save_pretrained folders, Hub ids, loaded objects.

A NaFlex image processor returns patches, a patch mask and the patch grid per image; `NaFlexPreprocess`
packs them into one tensor per image (readout.tower_hf_siglip2.pack), which the readout unpacks.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from siglip_dola.loading import hub
from siglip_dola.loading.parts import AdapterParts, Loaded, weight_files

HUB_FILES = [
    "config.json", "model-*.safetensors",
    "preprocessor_config.json", "processor_config.json", "tokenizer*", "special_tokens_map.json",
    "spiece.model", "*.model",
]
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json"]
# config.json model_type -> transformers class holding both towers
MODEL_CLASSES = {"siglip": "SiglipModel", "clip": "CLIPModel", "siglip2": "Siglip2Model"}
SUPPORTED_MODEL_TYPES = tuple(MODEL_CLASSES)


def is_hf_dir(folder: Path) -> bool:
    """True when `folder` holds an HF config.json (the save_pretrained layout)."""
    return (folder / "config.json").is_file()


def is_model(model) -> bool:
    """True for a transformers SiglipModel / CLIPModel / Siglip2Model (vision + text towers)."""
    import transformers

    # a class the installed release lacks (Siglip2Model arrived in transformers 4.49) cannot be an instance
    classes = tuple(getattr(transformers, name, None) for name in MODEL_CLASSES.values())
    return isinstance(model, tuple(cls for cls in classes if cls is not None))


def load_dir(folder: Path):
    """(model, preprocess, tokenizer) from a local HF folder; safetensors weights only, no network."""
    model_type = _check_config(folder)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{folder} has no model.safetensors: only safetensors weights are loaded (nothing is unpickled)"
        )
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    model_class = getattr(transformers, MODEL_CLASSES[model_type], None)
    if model_class is None:
        raise ValueError(f"{folder}/config.json has model_type={model_type!r}, whose {MODEL_CLASSES[model_type]} "
                         f"this transformers {transformers.__version__} lacks: upgrade transformers "
                         "(pip install -U transformers)")
    with _quiet_transformers():
        model = model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True)
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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")   # org/name


def is_name(name: str) -> bool:
    """A Hugging Face id `org/name` (checked without importing transformers)."""
    return HUB_ID.fullmatch(name) is not None


def load_name(name: str) -> Loaded:
    model, preprocess, tokenizer, folder = load_hub(name)
    return Loaded(model, preprocess, tokenizer, name, weight_files(folder))


def load_folder(folder: Path) -> Loaded:
    return Loaded(*load_dir(folder), str(folder), weight_files(folder))


def _check_config(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{folder}/config.json has model_type={model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)} "
            "(SigLIP and fixed-resolution SigLIP 2: 'siglip'; CLIP: 'clip'; SigLIP 2 NaFlex: 'siglip2'; "
            "vision-only checkpoints: load the module yourself and use from_model)"
        )
    return model_type


def parts(model, preprocess=None, tokenizer=None) -> AdapterParts:
    """Preprocess / text encoder / logit scale and bias of a SiglipModel / CLIPModel / Siglip2Model."""
    if tokenizer is None:
        raise TypeError(f"from_model({type(model).__name__}) needs tokenizer= "
                        "(e.g. AutoTokenizer.from_pretrained(...))")
    bias = getattr(model, "logit_bias", None)   # CLIP has none (softmax training)
    return AdapterParts(
        preprocess=_wrap_processor(preprocess, model),
        encode_text=_text_encoder(model, tokenizer),
        logit_scale=float(model.logit_scale.detach().float().reshape(-1)[0]),
        logit_bias=0.0 if bias is None else float(bias.detach().float().reshape(-1)[0]),
    )


def _default_processor(model):
    """The model type's own image processor at the model's size (its checkpoint's settings are not known)."""
    import transformers

    model_type = model.config.model_type
    if model_type == "siglip2":
        vision = model.config.vision_config
        return transformers.Siglip2ImageProcessor(patch_size=vision.patch_size, max_num_patches=vision.num_patches)
    size = model.config.vision_config.image_size
    if model_type == "clip":
        return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return transformers.SiglipImageProcessor(size={"height": size, "width": size})


def _wrap_processor(processor, model):
    """PIL -> [3, H, W] (NaFlex: packed patches): an HF image processor is wrapped; a plain callable is used as is."""
    if processor is None:
        processor = _default_processor(model)
    if not hasattr(processor, "preprocess"):
        return processor
    if "spatial_shapes" in getattr(processor, "model_input_names", ()):
        return NaFlexPreprocess(processor)
    return HFImagePreprocess(processor)


def hwc_images(image) -> dict:
    """A PIL image as the processor arguments every supported transformers release reads the same way.

    The image goes in as a height x width x 3 uint8 array, and its layout is said: unsaid, a 1- or 3-pixel-high
    image is guessed channels-first. The array, not the PIL image, carries the layout: transformers 5.17's fast
    processors turn a PIL image into channels-first first and then apply ``input_data_format="channels_last"``
    to it, so every image failed ("The size of tensor a (500) must match the size of tensor b (3)").
    """
    return {"images": np.array(image.convert("RGB")), "input_data_format": "channels_last"}


class HFImagePreprocess:
    """PIL -> [3, H, W] through an HF image processor; its repr names the settings (index manifests record it)."""

    SETTINGS = ("size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(**hwc_images(image), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        config = self.processor.to_dict()
        settings = ", ".join(f"{key}={config[key]!r}" for key in self.SETTINGS if key in config)
        return f"{type(self.processor).__name__}({settings})"


class NaFlexPreprocess(HFImagePreprocess):
    """PIL -> packed NaFlex patches (1 + P, C*p*p) through a Siglip2 image processor (tower_hf_siglip2.pack)."""

    SETTINGS = (*HFImagePreprocess.SETTINGS, "patch_size", "max_num_patches")

    def __call__(self, image):
        from siglip_dola.readout.tower_hf_siglip2 import pack

        out = self.processor(**hwc_images(image), return_tensors="pt")
        return pack(out["pixel_values"], out["spatial_shapes"])[0]


def _text_encoder(model, tokenizer):
    max_length = model.config.text_config.max_position_embeddings
    # SigLIP was trained on max_length padding and its text model takes no attention mask; CLIP (eos pooling)
    # and SigLIP2 (processor: padding="max_length", max_length=64, with the mask) get their attention mask.
    with_mask = model.config.model_type in ("clip", "siglip2")
    if model.config.model_type == "siglip2":
        max_length = min(max_length, 64)

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(list(texts), padding="max_length", max_length=max_length,
                           truncation=True, return_tensors="pt")
        device = model.logit_scale.device
        mask = tokens.get("attention_mask") if with_mask else None
        output = model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                         **({"attention_mask": mask.to(device)} if mask is not None else {}))
        return output if isinstance(output, torch.Tensor) else output.pooler_output  # (C, D)

    return encode
