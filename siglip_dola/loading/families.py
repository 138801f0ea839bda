"""The model families: ONE table, name -> detect an object, load by path, load by name, wrap, accepted forms.

    FAMILIES["hf"].detect(model)      # wrap: is this loaded object one of the family's?  (from_model)
    FAMILIES["hf"].is_dir(folder)     # load by path: is this local folder one of its layouts?  (load)
    FAMILIES["hf"].is_name(name)      # load by name: is this name one of its forms?  (load)
    FAMILIES["hf"].wrap(model, preprocess, tokenizer, readout) -> AdapterParts   # preprocess, text tower, scale

Objects are matched in table order (the vision-only family accepts any module, so it comes last); names and
folders go to the one family that claims them (the forms are disjoint). The layer readout of a family's
objects is a tower module of readout/ (``readout/tower_*.py``, found by readout.TOWERS); a family whose towers are
new adds one such file, nothing else in readout/.
The accepted-forms text of errors and --help is generated from the table (:func:`accepted_forms`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from siglip_dola.loading import hf, janus_hf, open_clip, vision_only
from siglip_dola.loading.parts import AdapterParts, Loaded


@dataclass(frozen=True)
class Family:
    name: str                                          # LoadedModel.backend
    forms: str                                         # what users may pass, for errors and --help
    detect: Callable[[object], bool] | None = None     # wrap: the loaded object is one of ours
    wrap: Callable[..., AdapterParts] | None = None    # (model, preprocess, tokenizer, readout) -> parts
    is_dir: Callable[[Path], bool] | None = None       # load by path
    load_dir: Callable[[Path], Loaded] | None = None
    is_name: Callable[[str], bool] | None = None       # load by name
    load_name: Callable[[str], Loaded] | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("open_clip", detect=open_clip.is_model,
           wrap=lambda model, preprocess, tokenizer, readout: open_clip.parts(model, preprocess, tokenizer),
           is_dir=open_clip.is_open_clip_dir, load_dir=open_clip.load_folder,
           is_name=open_clip.is_name, load_name=open_clip.load_name,
           forms="open_clip: a name with a pretrained tag 'ViT-L-16-SigLIP-384:webli', 'ViT-L-14-336:openai', "
                 "'ViT-H-14-378-quickgelu:dfn5b', or a local checkpoint 'ViT-L-16-SigLIP-384:/path/to/weights"
                 ".safetensors' (.pt/.pth/.bin are read with weights_only=True); 'hf-hub:timm/ViT-L-16-SigLIP-384'; "
                 "a folder with open_clip_config.json + weights; a loaded CLIP / CustomTextCLIP / CoCa"),
    Family("hf", detect=hf.is_model,
           wrap=lambda model, preprocess, tokenizer, readout: hf.parts(model, preprocess, tokenizer),
           is_dir=hf.is_hf_dir, load_dir=hf.load_folder, is_name=hf.is_name, load_name=hf.load_name,
           forms="Hugging Face: an id of a SigLIP, CLIP or SigLIP2 (NaFlex) model 'google/siglip-large-patch16-384', "
                 "'openai/clip-vit-large-patch14-336', 'google/siglip2-base-patch16-naflex'; a save_pretrained "
                 "folder (config.json + model.safetensors); a loaded SiglipModel / CLIPModel / Siglip2Model"),
    Family("janus", is_name=lambda name: name.startswith(janus_hf.PREFIX),
           load_name=lambda name: Loaded(*janus_hf.load(name[len(janus_hf.PREFIX):])),
           forms="'janus:/path/to/Janus-Pro-1B' or 'janus:deepseek-community/Janus-Pro-1B' (transformers' Janus: "
                 "its vision tower, wrapped as vision-only, read with head_from)"),
    Family("timm", detect=vision_only.is_model,
           wrap=lambda model, preprocess, tokenizer, readout: vision_only.parts(
               model, preprocess, tokenizer, image_size=tuple(readout.image_size)),
           forms="vision-only: a loaded timm VisionTransformer or Janus vision tower (from_model only; bring a "
                 "text bank)"),
)}


def accepted_forms() -> str:
    """Every family's accepted forms, one sentence each (the default model first)."""
    return "; ".join(["None or 'embedded' (the embedded offline model)", *(f.forms for f in FAMILIES.values())])


def family_of(model) -> Family:
    """The first family whose `detect` accepts the loaded object."""
    for family in FAMILIES.values():
        if family.detect is not None and family.detect(model):
            return family
    raise TypeError(f"model must be one of: {accepted_forms()}; got {type(model).__name__}")


def load_path(path: Path) -> Loaded:
    """A local folder, by the family whose layout it has; a bare checkpoint file needs its architecture."""
    if path.is_dir():
        for family in FAMILIES.values():
            if family.is_dir is not None and family.is_dir(path):
                return family.load_dir(path)
        raise ValueError(f"folder {path} has neither config.json (HF) nor open_clip_config.json (open_clip); "
                         f"accepted forms: {accepted_forms()}")
    raise ValueError(f"checkpoint file {path}: say which architecture it is, e.g. "
                     f"'ViT-L-16-SigLIP-384:{path}'; accepted forms: {accepted_forms()}")


def claimed_name(name: str) -> bool:
    """A name whose form a family claims by prefix (``janus:``, ``hf-hub:``) is never read as a local path."""
    return name.startswith((janus_hf.PREFIX, "hf-hub:"))


def load_name(name: str) -> Loaded:
    """A model name, by the family that claims it."""
    for family in FAMILIES.values():
        if family.is_name is not None and family.is_name(name):
            return family.load_name(name)
    raise ValueError(f"unknown model {name!r}; accepted forms: {accepted_forms()}")
