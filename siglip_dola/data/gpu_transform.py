"""A model's eval preprocess as tensor operations, so that decoded uint8 images are resized, cropped and normalised
where they already are (the GPU, after nvJPEG): the settings are read off the preprocess object itself.

Mapped: torchvision ``Compose`` chains as open_clip and timm build them (``Resize`` to a size or a shortest edge,
``CenterCrop``, RGB conversions, ``ToTensor``/``MaybeToTensor``, ``Normalize``) and HF image processors
(``size`` height/width or shortest_edge, ``resample``, ``do_center_crop``/``crop_size``, ``rescale_factor``,
``image_mean``/``image_std``). Anything else raises :class:`UnmappablePreprocess` naming the step.

The steps run in the preprocess's own order and number format: resize on uint8 (rounded back to uint8, as PIL
and torchvision store their result), crop, then the scaling and normalisation in the arithmetic of the code that
the CPU path runs (``SCALINGS``): ToTensor's x / 255 then Normalize's (x - mean) / std in fp32; an HF torchvision
("fast") processor's fused (x - mean / r) / (std / r); an HF PIL/NumPy processor's fp32(fp64(x) * r), then
(x - mean) / std in fp32. The resize runs as the CPU path's resizer does (Pillow for open_clip, timm and HF PIL
processors; torch's uint8 kernel for HF torchvision processors): two rounded passes in its order
(data/separable_resize.py), within a level of its fixed-point weights; without a resize the result is the
preprocess's own, bit for bit (tested on CPU against the preprocess objects). nvJPEG's decode approximates
libjpeg-turbo's (docs/evaluation.md has the measured agreement).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms import functional as F

from siglip_dola.data.pixel_split import device_constant
from siglip_dola.data.separable_resize import resize_uint8

# PIL resample codes (HF processors store them) -> torchvision's modes
_PIL_RESAMPLE = {0: InterpolationMode.NEAREST_EXACT, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC,
                 1: InterpolationMode.LANCZOS, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
_TENSOR_MODES = (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT, InterpolationMode.BILINEAR,
                 InterpolationMode.BICUBIC)
# steps that change nothing for an RGB uint8 image decoded as RGB (open_clip's, timm's conversions to RGB)
_RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb", "convert_to_rgb", "ToRGB")
_TO_TENSOR_STEPS = ("ToTensor", "MaybeToTensor")
# how uint8 becomes the model's floats: torchvision's ToTensor + Normalize; an HF torchvision-backed processor
# (transformers' fast ones, the default in 5.x), which folds the rescale into the normalisation; an HF PIL/NumPy one
SCALINGS = ("to_tensor", "hf_fused", "hf_numpy")


class UnmappablePreprocess(ValueError):
    """The preprocess has a step with no tensor equivalent here (so decode='gpu' cannot reproduce it)."""


@dataclass(frozen=True)
class GpuPreprocess:
    """Resize -> crop -> scale -> normalise, as tensor operations on uint8 [3, h, w] images of any sizes.

    resize: (H, W) for an exact size, or (S,) for the shortest edge S (the longer one scaled, truncated, as
    torchvision and HF do); None: no resize. crop: (H, W) centre crop or None; crop_floor: HF's top-left
    (floor of half the margin) instead of torchvision's (rounded). scaling: one of SCALINGS; rescale_factor:
    HF's (None: no rescale).
    """
    resize: tuple[int, ...] | None
    interpolation: InterpolationMode
    resizer: str   # the CPU path's resizer (separable_resize.RESIZERS), whose arithmetic the resize follows
    crop: tuple[int, int] | None
    crop_floor: bool
    scaling: str
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step."""
        if self.resize is None:
            return height, width
        if len(self.resize) == 2:
            return self.resize
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resized_size(height, width)

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, h, w] (one source size) -> uint8 [n, 3, H, W]: the resize, then the centre crop."""
        height, width = images.shape[-2:]
        size = self.resized_size(height, width)
        if self.resize is not None and (height, width) != size:
            images = resize_uint8(images, size, self.interpolation, self.resizer)
        if self.crop is None:
            return images
        crop_h, crop_w = self.crop
        height, width = images.shape[-2:]
        if crop_h > height or crop_w > width or not self.crop_floor:
            return F.center_crop(images, [crop_h, crop_w])   # torchvision's rounding (and its padding)
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return images[..., top:top + crop_h, left:left + crop_w]

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the preprocess's fp32 pixels, on their device, in its own arithmetic."""
        device, factor = pixels.device, self.rescale_factor
        if self.scaling == "to_tensor":
            out = pixels.to(torch.float32).div_(device_constant((255.0,), device))
        elif self.scaling == "hf_numpy" and factor is not None:   # numpy: (x.astype(float64) * r).astype(float32)
            out = pixels.to(torch.float64).mul_(factor).to(torch.float32)
        elif self.scaling == "hf_fused" and factor is not None and self.mean is not None:
            # transformers' fast processors: normalize(x, mean / r, std / r), the constants made in fp32
            fused_mean, fused_std = (_fused(values, factor) for values in (self.mean, self.std))
            return pixels.to(torch.float32).sub_(device_constant(fused_mean, device)).div_(
                device_constant(fused_std, device))
        elif factor is not None:   # hf_fused without a normalisation: x * r
            out = pixels.to(torch.float32).mul_(factor)
        else:
            out = pixels.to(torch.float32)
        if self.mean is not None:
            out = out.sub_(device_constant(self.mean, device)).div_(device_constant(self.std, device))
        return out

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, h_i, w_i] images (any sizes, one device) -> fp32 [B, 3, H, W]; images of one size share a call."""
        if not images:
            raise ValueError("images must hold at least one image")
        sizes = {self.output_size(*image.shape[-2:]) for image in images}
        if len(sizes) != 1:
            raise ValueError(f"this preprocess gives images of several sizes {sorted(sizes)}: they cannot be stacked")
        out = torch.empty((len(images), 3, *sizes.pop()), dtype=torch.uint8, device=images[0].device)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape[-2:]), []).append(position)
        for positions in by_shape.values():
            group = torch.stack([images[p] for p in positions])                  # (n, 3, h, w) uint8
            done = self.geometry(group)
            if len(positions) == len(images):
                out = done.contiguous()
            else:   # slice copies: an index tensor on the device would be a blocking host->device copy
                for k, position in enumerate(positions):
                    out[position].copy_(done[k])
        return self.finish(out)


def _fused(values: tuple[float, float, float], factor: float) -> tuple[float, float, float]:
    """values / factor as transformers' fast processors compute it: an fp32 tensor times 1 / factor."""
    return tuple((torch.tensor(values, dtype=torch.float32) * (1.0 / factor)).tolist())


_NEAREST = (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT)


def _not_pillow_nearest(mode: InterpolationMode, resizer: str, where: str) -> None:
    """Pillow's nearest neighbour rounds sample positions its own way (a fifth of the pixels moved when enlarging
    64 -> 224, measured): refused rather than approximated."""
    if resizer == "pillow" and mode in _NEAREST:
        raise UnmappablePreprocess(f"{where}: a nearest-neighbour resize of PIL images is not reproduced on tensors")


def _interpolation(value, where: str) -> InterpolationMode:
    mode = _PIL_RESAMPLE.get(int(value)) if isinstance(value, int) else value
    if not isinstance(mode, InterpolationMode) or mode not in _TENSOR_MODES:
        raise UnmappablePreprocess(f"{where}: interpolation {value!r} has no tensor resize (only nearest, bilinear, "
                                   "bicubic)")
    return mode


def _three(values, name: str, where: str) -> tuple[float, float, float]:
    flat = torch.as_tensor(values, dtype=torch.float64).flatten()
    if flat.numel() not in (1, 3):
        raise UnmappablePreprocess(f"{where}: {name} must have 1 or 3 values, got {flat.numel()}")
    return tuple(flat.expand(3).tolist())


def _from_compose(preprocess: Compose) -> GpuPreprocess:
    fields = dict(resize=None, interpolation=InterpolationMode.BILINEAR, resizer="pillow", crop=None, crop_floor=False,
                  scaling="to_tensor", rescale_factor=None, mean=None, std=None)
    seen_tensor = False
    for step in preprocess.transforms:
        name = getattr(step, "__name__", type(step).__name__)
        where = f"preprocess step {name}"
        if type(step) is Resize and not seen_tensor and fields["resize"] is None and fields["crop"] is None:
            if step.max_size is not None:
                raise UnmappablePreprocess(f"{where}: max_size={step.max_size} is not mapped")
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            fields["resize"] = tuple(int(s) for s in size)
            fields["interpolation"] = _interpolation(step.interpolation, where)
            _not_pillow_nearest(fields["interpolation"], "pillow", where)
        elif type(step) is CenterCrop and not seen_tensor and fields["crop"] is None:
            fields["crop"] = (int(step.size[0]), int(step.size[1]))
        elif name in _RGB_STEPS and not seen_tensor:
            continue
        elif name in _TO_TENSOR_STEPS and not seen_tensor:
            seen_tensor = True
        elif type(step) is Normalize and seen_tensor and fields["mean"] is None:
            fields["mean"], fields["std"] = _three(step.mean, "mean", where), _three(step.std, "std", where)
        else:
            raise UnmappablePreprocess(f"{where} ({step!r}) has no GPU equivalent here, or is out of the expected "
                                       "order (resize, crop, to-tensor, normalize)")
    if not seen_tensor:
        raise UnmappablePreprocess("the preprocess has no ToTensor step, so its output format is unknown")
    return GpuPreprocess(**fields)


def hf_backend(processor) -> str:
    """'torchvision' or 'pil': which code an HF image processor runs (transformers 5 says it; 4.x's fast processors
    are the classes named ...Fast)."""
    backend = getattr(processor, "backend", None)
    if isinstance(backend, str):
        return backend
    return "torchvision" if type(processor).__name__.endswith("Fast") else "pil"


def _native_uint8(interpolation: InterpolationMode) -> bool:
    """Whether torchvision resizes uint8 images on CPU with torch's native uint8 kernel (two rounded passes)."""
    try:
        from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu
    except ImportError:   # a torchvision without it casts to float: one joint pass
        return False
    return bool(_do_native_uint8_resize_on_cpu(interpolation))


def _from_hf(processor) -> GpuPreprocess:
    where = type(processor).__name__
    if "spatial_shapes" in getattr(processor, "model_input_names", ()):
        raise UnmappablePreprocess(f"{where}: NaFlex (variable patch count) processors are not mapped")
    if getattr(processor, "do_pad", False):
        raise UnmappablePreprocess(f"{where}: do_pad=True is not mapped")
    size, resize = getattr(processor, "size", None) or {}, None
    if getattr(processor, "do_resize", True):
        size = {key: value for key, value in dict(size).items() if value is not None}
        if size.get("height") and size.get("width"):
            resize = (int(size["height"]), int(size["width"]))
        elif size.get("shortest_edge") and not size.get("longest_edge"):
            resize = (int(size["shortest_edge"]),)
        else:
            raise UnmappablePreprocess(f"{where}: size {size!r} is not mapped (height/width or shortest_edge)")
    crop = None
    if getattr(processor, "do_center_crop", False):
        crop_size = processor.crop_size
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    do_rescale, do_normalize = getattr(processor, "do_rescale", True), getattr(processor, "do_normalize", True)
    interpolation = _interpolation(getattr(processor, "resample", 3), f"{where}.resample")
    torchvision_backend = hf_backend(processor) == "torchvision"
    resizer = "pillow" if not torchvision_backend else "torch_uint8" if _native_uint8(interpolation) else "torch_float"
    _not_pillow_nearest(interpolation, resizer, f"{where}.resample")
    return GpuPreprocess(
        resize=resize, interpolation=interpolation, resizer=resizer,
        crop=crop, crop_floor=True, scaling="hf_fused" if torchvision_backend else "hf_numpy",
        rescale_factor=float(processor.rescale_factor) if do_rescale else None,
        mean=_three(processor.image_mean, "image_mean", where) if do_normalize else None,
        std=_three(processor.image_std, "image_std", where) if do_normalize else None)


def map_preprocess(preprocess) -> GpuPreprocess:
    """The GpuPreprocess equal in settings to `preprocess` (a torchvision Compose, an HF image processor or our
    wrapper of one); UnmappablePreprocess naming the step otherwise."""
    processor = getattr(preprocess, "processor", preprocess)
    if hasattr(processor, "preprocess") and hasattr(processor, "image_mean"):
        return _from_hf(processor)
    if isinstance(preprocess, Compose):
        return _from_compose(preprocess)
    raise UnmappablePreprocess(f"preprocess {type(preprocess).__name__} is neither a torchvision Compose nor an HF "
                               "image processor; decode='gpu' cannot reproduce it")
