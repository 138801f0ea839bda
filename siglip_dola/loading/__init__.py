"""`load(name_or_path)` and `from_model(model)`: one object with readout, preprocess, text encoder and logit scale.

Accepted names: the embedded default, and each model family's forms (loading/families.py, one table:
`families.accepted_forms()`): open_clip names `NAME:TAG`, `hf-hub:org/repo`, Hugging Face ids `org/name`,
`janus:<folder or hub id>` (transformers' Janus vision tower, read with `head_from`), local folders and checkpoints. Both functions take parts from other
checkpoints: `head_from`, `text_from`, `encode_text`, `logit_scale` (borrowed.py); `LoadedModel.sources` says
where each part came from.
Hub files are looked up in the local cache first; when missing and the Hub is unreachable, loading fails
within seconds (`hub.HubUnavailableError`) with a message on how to point at local weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from siglip_dola.loading import borrowed, families
from siglip_dola.loading import hf as hf_adapter
from siglip_dola.loading.embedded import EMBEDDED_CALIBRATION, EMBEDDED_DIR
from siglip_dola.loading.parts import Loaded, weight_files

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model_id: str                      # canonical id, written into results / manifests / calibration files
    readout: object                    # siglip_dola.readout.Readout
    preprocess: Callable               # PIL.Image -> FloatTensor [3, H, W]
    encode_text: Callable | None       # list[str] -> FloatTensor [C, D] raw fp32; None without a text tower
    logit_scale: float                 # as stored (log space); tau = 1 / exp(logit_scale)
    logit_bias: float
    device: torch.device
    dtype: torch.dtype                 # compute dtype (autocast when not fp32)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the underlying module
    backend: str = ""                  # its family: a key of loading.families.FAMILIES
    fingerprint: str | None = field(default=None, repr=False)       # weights identity, see weights_fingerprint
    calibration: str | None = None     # default DoLa calibration (path, or "embedded": the shipped one); None: uncalibrated
    sources: dict = field(default_factory=dict)   # where vision, head, text, logit_scale, logit_bias came from

    @property
    def tau(self) -> float:
        """Softmax temperature 1 / exp(logit_scale)."""
        return 1.0 / math.exp(self.logit_scale)

    @property
    def weights_fingerprint(self) -> str:
        """Short hash identifying the weights (files' size/mtime for load(), sampled tensors for from_model())."""
        if self.fingerprint is None:
            self.fingerprint = tensor_fingerprint(self.model) if self.model is not None else ""
        return self.fingerprint


def load(name_or_path: str | Path | None = None, device=None, precision: str | None = None, *, head_from=None,
         text_from=None, encode_text=None, logit_scale: float | None = None,
         logit_bias: float | None = None) -> LoadedModel:
    """Load a SigLIP / CLIP / SigLIP2 model by name or path (None -> the embedded default) in eval mode on `device`.

    head_from / text_from / encode_text / logit_scale / logit_bias: parts from another checkpoint, as in from_model.
    """
    device = resolve_device(device)
    dtype = resolve_precision(precision, device)
    found = _load_by_name(name_or_path)
    model = found.model.eval().requires_grad_(False).to(device)
    loaded = _borrowing(model, found.preprocess, found.tokenizer, found.model_id, device, precision, head_from,
                        text_from, encode_text, logit_scale, logit_bias, fingerprint=file_fingerprint(found.weights))
    if found.model_id == "embedded" and EMBEDDED_CALIBRATION.is_file():
        loaded.calibration = "embedded"  # the shipped calibration (chosen on its val split) is its default
    return loaded


def from_model(model, preprocess=None, tokenizer=None, model_id: str | None = None,
               logit_scale: float | None = None, logit_bias: float | None = None,
               precision: str | None = None, *, encode_text=None, head_from=None, text_from=None) -> LoadedModel:
    """Wrap an already-loaded open_clip model, HF SiglipModel / CLIPModel / Siglip2Model, or vision-only tower.

    The model is used as is: not moved, not cast, not switched to eval mode. SigLIP towers have no
    dropout by default, so train/eval give the same embeddings; if yours has active dropout or
    stochastic depth, call `model.eval()` yourself first.

    Parts from another checkpoint (borrowed.py; each a name or path `load` accepts, a LoadedModel or, for the
    head only, an nn.Module): `head_from` reads the model's layers through that SigLIP's MAP head (Janus's tower
    has none, or one it never trained) and, unless text_from / encode_text say otherwise, brings its text tower
    and logit scale; `text_from` brings a text tower and logit scale; `encode_text` is a callable
    list[str] -> [C, D]. The logit scale comes from the text checkpoint or `logit_scale`: a vision-only tower
    without either is a ValueError naming logit_scale (tau shapes every q_j, a guessed one must not pass).
    """
    family = families.family_of(model)
    device = _model_device(model)
    model_id = model_id or f"{family.name}:{type(model).__name__}"
    return _borrowing(model, preprocess, tokenizer, model_id, device, precision, head_from, text_from,
                      encode_text, logit_scale, logit_bias)


def _borrowing(model, preprocess, tokenizer, model_id, device, precision, head_from, text_from, encode_text,
               logit_scale, logit_bias, fingerprint: str | None = None) -> LoadedModel:
    """A LoadedModel of `model` with the parts named by the borrowing arguments (borrowed.finish)."""
    dtype = resolve_precision(precision, device)
    head = borrowed.resolve(head_from, "head_from", load, device, precision, like=model)
    if text_from is None or text_from is head_from:   # by default (and when named twice) the head's checkpoint
        text = head if encode_text is None and head is not None and head.loaded is not None else None
    else:
        text = borrowed.resolve(text_from, "text_from", load, device, precision, like=model)
    loaded = _assemble(model, preprocess, tokenizer, model_id, device, dtype, head_from=head and head.module)
    loaded.fingerprint = fingerprint
    borrowed.finish(loaded, head=head, text=text, encode_text=encode_text, logit_scale=logit_scale,
                    logit_bias=logit_bias, wrap_text=lambda raw: _wrap_text_encoder(raw, device, dtype),
                    fingerprint=lambda b: b.loaded.weights_fingerprint if b.loaded else tensor_fingerprint(b.module))
    return loaded


def resolve_device(device) -> torch.device:
    """`device` as torch.device; None -> cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from error


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    """Compute dtype: None -> fp32 on CPU, bf16 on GPU; else one of PRECISIONS."""
    if precision is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid values: {sorted(PRECISIONS)} or None")
    return PRECISIONS[precision]


def autocast(device: torch.device | str, dtype: torch.dtype):
    """Autocast context for `dtype` on `device` (a no-op for fp32); the one helper, for LoadedModel.dtype."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _assemble(model, preprocess, tokenizer, model_id, device, dtype, head_from=None) -> LoadedModel:
    from siglip_dola.readout import from_model as readout_from_model

    family = families.family_of(model)
    readout = readout_from_model(model, head_from=head_from)
    parts = family.wrap(model, preprocess, tokenizer, readout)
    encode_text = None if parts.encode_text is None else _wrap_text_encoder(parts.encode_text, device, dtype)
    return LoadedModel(model_id=model_id, readout=readout, preprocess=parts.preprocess,
                       encode_text=encode_text, logit_scale=parts.logit_scale, logit_bias=parts.logit_bias,
                       device=device, dtype=dtype, model=model, backend=family.name)


def _wrap_text_encoder(encode_raw, device, dtype):
    def encode_text(texts: list[str]) -> torch.Tensor:
        """list[str] -> [C, D] raw (unnormalised) fp32 text embeddings on the model's device."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("encode_text(texts): texts must be a list of str")
        with torch.inference_mode(), autocast(device, dtype):
            return encode_raw(list(texts)).float()

    return encode_text


def _model_device(model) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _load_by_name(name) -> Loaded:
    """The embedded default, a local path or a name, by the family that claims it (loading/families.py)."""
    if name is None or name == "embedded":
        if not hf_adapter.is_hf_dir(EMBEDDED_DIR):
            raise FileNotFoundError(f"the embedded model is not installed at {EMBEDDED_DIR}")
        return Loaded(*hf_adapter.load_dir(EMBEDDED_DIR), "embedded", weight_files(EMBEDDED_DIR))
    if not isinstance(name, (str, Path)):
        raise TypeError(f"name_or_path must be a str, a Path or None; got {type(name).__name__}")
    name = str(name)
    if not families.claimed_name(name) and Path(name).expanduser().exists():
        return families.load_path(Path(name).expanduser().resolve())
    return families.load_name(name)


def file_fingerprint(paths: list[Path]) -> str:
    """Hash of the weight files' resolved paths, sizes and modification times (cheap, no reading)."""
    entries = [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def tensor_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """Hash of every state tensor's name, shape, dtype, float64 sum and a strided sample of its values."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::stride].to("cpu", torch.float64)
            total = float(flat.sum(dtype=torch.float64)) if flat.is_floating_point() else float(flat.sum())
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{total!r}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
