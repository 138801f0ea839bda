"""`janus:<folder or hub id>`: the vision tower of a transformers Janus checkpoint (model_type 'janus', 4.53+).

Only the vision tower is built and only its weights are read (safetensors, key prefix
``model.vision_model.``): Janus-Pro-7B's language model and image generator are never loaded. The tower has no
head (readout/tower_janus_hf.py), so it is used with ``head_from`` (a SigLIP checkpoint's head and text tower).
Images go through the checkpoint's own JanusImageProcessor (pad to square, resize) when the folder has one.
"""
from __future__ import annotations

import json
from pathlib import Path

from siglip_dola.loading import hub

PREFIX = "janus:"
HUB_FILES = ["config.json", "preprocessor_config.json"]
WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json"]
# where the vision tower's weights sit in each saved class (JanusForConditionalGeneration, JanusModel, the tower)
VISION_PREFIXES = ("model.vision_model.", "vision_model.", "")
NOT_TRANSFORMERS = ("{folder}/config.json has model_type={model_type!r}; `janus:` reads transformers' Janus "
                    "checkpoints (model_type 'janus', e.g. deepseek-community/Janus-Pro-1B). For the original "
                    "repository's checkpoints (model_type 'multi_modality'), load the model with its janus package "
                    "and pass it to from_model(vlm, head_from=...) or JanusDoLa(vlm, siglip=...)")


def load(spec: str):
    """(vision model, preprocess, tokenizer None, model_id, weight files) for `janus:<folder or hub id>`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path.resolve()
        model, preprocess, tokenizer, files = load_dir(folder)
        return model, preprocess, tokenizer, f"{PREFIX}{folder}", files
    if path.exists():
        raise ValueError(f"janus:{spec} must be a folder (transformers save_pretrained layout), not a file")
    folder = hub.snapshot(spec, HUB_FILES, WEIGHT_FILES)   # cache first; offline: HubUnavailableError in seconds
    index = folder / "model.safetensors.index.json"
    if index.is_file():   # only the shards holding the vision tower
        shards = sorted(set(_vision_keys(json.loads(index.read_text())["weight_map"]).values()))
        folder = hub.snapshot(spec, [*HUB_FILES, index.name, *shards[1:]], shards[:1])
    model, preprocess, tokenizer, files = load_dir(folder)
    return model, preprocess, tokenizer, f"{PREFIX}{spec}", files


def load_dir(folder: Path):
    """(JanusVisionModel fp32 eval, preprocess or None, None, weight files) from a local transformers Janus folder."""
    import torch
    from safetensors import safe_open

    vision_config = _vision_config(folder)
    try:
        from transformers import JanusVisionModel
    except ImportError:
        raise ImportError("janus: needs transformers >= 4.53 (Janus arrived there): "
                          "pip install 'transformers>=4.53'") from None
    files = _weight_files(folder)
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            prefix = _prefix(list(weights.keys()))
            state.update({key[len(prefix):]: weights.get_tensor(key) for key in weights.keys()
                          if key.startswith(prefix) and (prefix or not key.startswith("model."))})
    if not state:
        raise ValueError(f"{folder}: no Janus vision tower weights (keys under 'model.vision_model.') found in "
                         f"{[f.name for f in files]}")
    model = JanusVisionModel(vision_config)
    model.load_state_dict({key: value.to(torch.float32) for key, value in state.items()}, strict=True)
    return model.eval().requires_grad_(False), _processor(folder), None, files


def _vision_config(folder: Path):
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: `janus:` reads a transformers Janus folder "
                                "(save_pretrained layout: config.json + model.safetensors)")
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in ("janus", "janus_vision_model"):
        raise ValueError(NOT_TRANSFORMERS.format(folder=folder, model_type=model_type))
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    return config.vision_config if model_type == "janus" else config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_vision_keys(json.loads(index.read_text(encoding="utf-8"))["weight_map"]).values())
        return sorted(folder / shard for shard in shards)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} has no model.safetensors: only safetensors weights are read "
                            "(nothing is unpickled)")


def _vision_keys(weight_map: dict) -> dict:
    prefix = _prefix(list(weight_map))
    return {key: shard for key, shard in weight_map.items() if key.startswith(prefix)}


def _prefix(keys: list[str]) -> str:
    """The first VISION_PREFIXES entry under which the tower's patch embedding is stored."""
    for prefix in VISION_PREFIXES:
        if f"{prefix}embeddings.patch_embedding.weight" in keys:
            return prefix
    return VISION_PREFIXES[0]


def _processor(folder: Path):
    """The folder's JanusImageProcessor, wrapped PIL -> [3, H, W]; None (SigLIP's default) without one."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    from siglip_dola.loading.hf import HFImagePreprocess

    return HFImagePreprocess(AutoImageProcessor.from_pretrained(folder, local_files_only=True))
