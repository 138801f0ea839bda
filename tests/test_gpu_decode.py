"""decode='gpu' without a GPU: the preprocess -> tensor-transform mapping (against the real open_clip, timm and HF
preprocess objects and PIL's output), EXIF orientation (against PIL), the per-file CPU fallback and the errors.

The GPU transform code runs here on CPU tensors; the decode steps run with torchvision's CPU decoder (the same call
as nvJPEG's, another device)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, RandomResizedCrop, Resize
from torchvision.transforms.functional import pil_to_tensor

from siglip_dola.data.gpu_decode import apply_orientation, check_decode, iter_gpu_decoded, jpeg_orientation
from siglip_dola.data.gpu_transform import UnmappablePreprocess, map_preprocess


def _photo(width=500, height=375, seed=0) -> Image.Image:
    """A photo-like RGB image: smooth gradients, edges and mild noise (not flat: resizes do real work)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([128 + 100 * np.sin(x / 23.0), 128 + 90 * np.cos(y / 17.0), (x + y) % 256], -1)
    base[height // 3:height // 2, width // 4:width // 2] = (250, 20, 40)   # a hard-edged block
    image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(image, "RGB")


def _open_clip_transform(resize_mode: str, size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    return image_transform_v2(PreprocessCfg(size=size, mean=mean, std=std, interpolation="bicubic",
                                            resize_mode=resize_mode), is_train=False)


def _timm_transform():
    import timm.data
    return timm.data.create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.875,
                                      is_training=False)


def _hf_class(kind: str, backend: str):
    """transformers' SigLIP / CLIP image processor on `backend` ('torchvision' or 'pil'), or None where the installed
    release has none (4.x before the fast processors; its plain classes are the PIL ones)."""
    import transformers

    from siglip_dola.data.gpu_transform import hf_backend
    name = {"siglip": "SiglipImageProcessor", "clip": "CLIPImageProcessor"}[kind]
    for candidate in (name, f"{name}Pil", f"{name}Fast"):
        cls = getattr(transformers, candidate, None)
        if cls is not None and hf_backend(cls.__new__(cls)) == backend:
            return cls
    return None


def _hf(kind: str, backend: str = "default", resample: int = 3):
    import transformers
    cls = getattr(transformers, {"siglip": "SiglipImageProcessor", "clip": "CLIPImageProcessor"}[kind])
    if backend != "default":
        cls = _hf_class(kind, backend)
        if cls is None:
            pytest.skip(f"this transformers has no {backend} {kind} image processor")
    if kind == "siglip":
        return cls(size={"height": 224, "width": 224}, resample=resample)
    return cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=resample)


def _hf_call(processor, image):
    """The CPU path's own call of an HF processor (loading/hf.py)."""
    from siglip_dola.loading.hf import HFImagePreprocess
    return HFImagePreprocess(processor)(image)


def _step(compose, cls_name):
    return next((step for step in compose.transforms if type(step).__name__ == cls_name), None)


@pytest.mark.parametrize("resize_mode", ["squash", "shortest"])
def test_open_clip_settings_are_read_off_the_transform(resize_mode):
    preprocess = _open_clip_transform(resize_mode, mean=(0.48145466, 0.4578275, 0.40821073),
                                      std=(0.26862954, 0.26130258, 0.27577711))
    mapped = map_preprocess(preprocess)
    resize, normalize = _step(preprocess, "Resize"), _step(preprocess, "Normalize")
    expected = (resize.size,) if isinstance(resize.size, int) else tuple(resize.size)
    assert mapped.resize == expected and mapped.interpolation == resize.interpolation == InterpolationMode.BICUBIC
    crop = _step(preprocess, "CenterCrop")   # 'squash' has none
    assert mapped.crop == (None if crop is None else tuple(crop.size))
    assert mapped.mean == pytest.approx(tuple(normalize.mean)) and mapped.std == pytest.approx(tuple(normalize.std))
    assert mapped.scaling == "to_tensor" and mapped.resizer == "pillow" and not mapped.crop_floor


def test_timm_settings_are_read_off_the_transform():
    preprocess = _timm_transform()
    mapped = map_preprocess(preprocess)
    resize = _step(preprocess, "Resize")
    assert mapped.resize == (resize.size,) and resize.size == 256   # 224 / 0.875
    assert mapped.crop == (224, 224) and mapped.interpolation == InterpolationMode.BICUBIC
    assert mapped.mean == pytest.approx(tuple(_step(preprocess, "Normalize").mean.tolist()))


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hf_processor_settings_are_read_off_the_processor(kind, backend):
    processor = _hf(kind, backend)
    mapped = map_preprocess(processor)
    size = processor.size
    assert mapped.resize == ((size["height"], size["width"]) if "height" in size else (size["shortest_edge"],))
    assert mapped.crop == ((processor.crop_size["height"], processor.crop_size["width"])
                           if getattr(processor, "do_center_crop", False) else None)
    assert mapped.rescale_factor == pytest.approx(processor.rescale_factor)
    assert mapped.scaling == {"torchvision": "hf_fused", "pil": "hf_numpy"}[backend]
    assert mapped.resizer in (("torch_uint8", "torch_float") if backend == "torchvision" else ("pillow",))
    assert mapped.mean == pytest.approx(tuple(processor.image_mean))
    assert mapped.interpolation == InterpolationMode.BICUBIC and int(processor.resample) == 3


def _agreement(expected: torch.Tensor, got: torch.Tensor, std: float) -> tuple[float, float]:
    """(share of values off by more than 2 uint8 levels, mean absolute difference in levels)."""
    levels = (expected - got).abs() * std * 255.0
    return float((levels > 2.01).float().mean()), float(levels.mean())


_SOURCES = {"open_clip_squash": lambda: _open_clip_transform("squash"),
            "open_clip_shortest": lambda: _open_clip_transform("shortest"), "timm": _timm_transform,
            "hf_siglip": lambda: _hf("siglip"), "hf_clip": lambda: _hf("clip"),
            "hf_siglip_torchvision": lambda: _hf("siglip", "torchvision"), "hf_siglip_pil": lambda: _hf("siglip", "pil"),
            "hf_clip_torchvision": lambda: _hf("clip", "torchvision"), "hf_clip_pil": lambda: _hf("clip", "pil"),
            "hf_siglip_bilinear": lambda: _hf("siglip", resample=2)}


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("source", list(_SOURCES))
@pytest.mark.parametrize("size", [(500, 375), (333, 500), (224, 224), (97, 131), (40, 30), (7, 300), (64, 64)])
def test_tensor_transform_matches_the_cpu_preprocess(source, size, mode):
    """The mapped transform on the decoded uint8 tensor vs the model's own preprocess on the PIL image, as the CPU
    path runs it (decode_image converts to RGB first: a greyscale JPEG decodes to three equal channels on the GPU).
    Shrinking, enlarging, non-square, tiny and greyscale images; two rounded resize passes in the resizer's order
    land within a level of Pillow's and torch's fixed-point filters."""
    preprocess = _SOURCES[source]()
    image = _photo(*size, seed=size[0]).convert(mode).convert("RGB")
    expected = _hf_call(preprocess, image) if source.startswith("hf") else preprocess(image)
    mapped = map_preprocess(preprocess)
    got = mapped([pil_to_tensor(image)])[0]
    assert got.shape == expected.shape and got.dtype == torch.float32
    levels = (expected.float() - got).abs() * min(mapped.std) * 255.0
    assert float(levels.max()) <= 2.01, float(levels.max())
    assert float((levels > 1.01).float().mean()) <= 1e-3
    assert float(levels.mean()) <= (0.2 if "bilinear" in source else 0.05), float(levels.mean())


@pytest.mark.parametrize("source", ["open_clip_squash", "hf_siglip_torchvision", "hf_siglip_pil"])
def test_without_a_resize_the_pixels_are_the_cpu_preprocess_bit_for_bit(source):
    """224x224 into a 224x224 preprocess: the scaling and normalisation follow the preprocess's own arithmetic
    (ToTensor + Normalize; transformers' fused fast-processor normalisation; its NumPy fp64 rescale)."""
    preprocess = _SOURCES[source]()
    image = _photo(224, 224, seed=5)
    expected = _hf_call(preprocess, image) if source.startswith("hf") else preprocess(image)
    assert torch.equal(map_preprocess(preprocess)([pil_to_tensor(image)])[0], expected)


def test_images_of_several_sizes_are_grouped_and_kept_in_order():
    preprocess = _open_clip_transform("shortest")
    mapped = map_preprocess(preprocess)
    images = [_photo(500, 375, 1), _photo(300, 400, 2), _photo(500, 375, 3)]
    got = mapped([pil_to_tensor(i) for i in images])
    for k, image in enumerate(images):
        assert torch.equal(got[k], mapped([pil_to_tensor(image)])[0])


@pytest.mark.parametrize("step", [RandomResizedCrop(224), Resize(224, max_size=300),
                                  Resize(224, interpolation=InterpolationMode.NEAREST)])
def test_unmappable_steps_are_refused_by_name(step):
    preprocess = Compose([step, CenterCrop(224), *(_open_clip_transform("squash").transforms[-2:])])
    with pytest.raises(UnmappablePreprocess, match=type(step).__name__):
        map_preprocess(preprocess)


def test_unmappable_preprocess_kinds_are_refused():
    import timm.data
    border = timm.data.create_transform(input_size=(3, 224, 224), crop_mode="border", crop_pct=1.0, is_training=False)
    with pytest.raises(UnmappablePreprocess, match="ResizeKeepRatio"):
        map_preprocess(border)
    with pytest.raises(UnmappablePreprocess, match="neither a torchvision Compose"):
        map_preprocess(lambda image: image)
    with pytest.raises(UnmappablePreprocess, match="ToTensor"):
        map_preprocess(Compose([Resize(224), CenterCrop(224)]))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    image = _photo(40, 30, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    image.save(path, quality=95, exif=exif.tobytes())
    data = path.read_bytes()
    assert jpeg_orientation(data) == orientation
    with Image.open(path) as stored:
        expected = pil_to_tensor(ImageOps.exif_transpose(stored).convert("RGB"))
        raw = pil_to_tensor(stored.convert("RGB"))
    assert torch.equal(apply_orientation(raw, orientation), expected)


def test_only_rgb_and_grey_jpegs_go_to_the_gpu_decoder(tmp_path):
    image = _photo(32, 24)
    image.save(tmp_path / "a.png")
    image.convert("CMYK").save(tmp_path / "c.jpg")
    image.convert("L").save(tmp_path / "g.jpg")
    assert jpeg_orientation((tmp_path / "a.png").read_bytes()) is None
    assert jpeg_orientation((tmp_path / "c.jpg").read_bytes()) is None
    assert jpeg_orientation((tmp_path / "g.jpg").read_bytes()) == 1
    assert jpeg_orientation(b"\xff\xd8\xff" + b"\0" * 20) is None


@pytest.mark.parametrize("workers", [0, 1])
def test_mixed_files_fall_back_file_by_file_and_keep_input_order(tmp_path, workers):
    """JPEGs through the batch decoder, PNG / CMYK / unreadable files through the CPU path, in input order."""
    from siglip_dola.data.images import decode_image

    preprocess = _open_clip_transform("squash", size=64)
    paths = []
    for k, (name, mode) in enumerate([("0.jpg", "RGB"), ("1.png", "RGB"), ("2.jpg", "CMYK"), ("3.jpg", "L"),
                                      ("4.jpg", "RGB")]):
        _photo(90 + k, 70, k).convert(mode).save(tmp_path / name, quality=92)
        paths.append(str(tmp_path / name))
    (tmp_path / "5.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths.insert(2, str(tmp_path / "5.jpg"))
    batches = list(iter_gpu_decoded(paths, preprocess, batch_size=4, workers=workers, device=torch.device("cpu")))
    assert [b[4] for b in batches] == [4, 2]
    indices = [i for b in batches for i in b[0]]
    assert indices == [0, 1, 3, 4, 5] and [s[0] for b in batches for s in b[3]] == [paths[2]]
    pixels = torch.cat([b[2] for b in batches])
    for row, index in enumerate(indices):
        expected = decode_image(paths[index], preprocess)
        if paths[index].endswith(".png") or index == 3:   # the CPU path itself: exact
            assert torch.equal(pixels[row], expected)
        else:
            assert _agreement(expected, pixels[row], 0.5)[1] <= 1.0   # libjpeg-turbo twice, then the resize


def test_check_decode_errors_name_the_argument():
    check_decode("cpu", "cpu")
    with pytest.raises(ValueError, match=r"decode must be one of \['cpu', 'gpu'\], got 'nvjpeg'"):
        check_decode("nvjpeg", "cpu")
    with pytest.raises(ValueError, match="decode='gpu' needs the model on a CUDA device"):
        check_decode("gpu", torch.device("cpu"))


@pytest.mark.parametrize("subsampling", [-1, 0])
def test_the_embedded_models_jpegs_come_out_as_the_cpu_path_gives_them(tmp_path, subsampling):
    """The whole decode='gpu' path (torchvision's CPU decoder in nvJPEG's place) against the CPU path, with the embedded
    model's own HF processor (64x64 shapes images: no resize): equal pixels, 4:2:0 and 4:4:4 JPEGs alike."""
    from transformers import AutoImageProcessor

    from siglip_dola.data.images import decode_image
    from siglip_dola.data.shapes import make_split
    from siglip_dola.loading.embedded import EMBEDDED_DIR
    from siglip_dola.loading.hf import HFImagePreprocess

    preprocess = HFImagePreprocess(AutoImageProcessor.from_pretrained(EMBEDDED_DIR, local_files_only=True))
    paths = []
    for index, sample in enumerate(make_split("test")[:12]):
        path = tmp_path / f"{index}.jpg"
        sample.image.convert("RGB").save(path, "JPEG", quality=90, subsampling=subsampling)
        paths.append(str(path))
    batches = list(iter_gpu_decoded(paths, preprocess, batch_size=5, workers=0, device=torch.device("cpu")))
    pixels = torch.cat([b[2] for b in batches])
    assert [i for b in batches for i in b[0]] == list(range(12))
    assert torch.equal(pixels, torch.stack([decode_image(p, preprocess) for p in paths]))


def test_nearest_resizes_of_pil_images_are_refused_and_of_tensors_mapped():
    with pytest.raises(UnmappablePreprocess, match="nearest-neighbour"):
        map_preprocess(_hf("siglip", "pil", resample=0))
    processor = _hf("siglip", "torchvision", resample=0)   # transformers resizes tensors: NEAREST_EXACT, as here
    image = _photo(97, 131, seed=4)
    assert torch.equal(map_preprocess(processor)([pil_to_tensor(image)])[0], _hf_call(processor, image))
