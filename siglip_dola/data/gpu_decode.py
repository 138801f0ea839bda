"""decode='gpu': workers read JPEG bytes, nvJPEG decodes each batch on the GPU, the model's preprocess runs there.

Why: PIL decoding costs a host core ~2-5 ms per photo, so a host with few cores per GPU, or a small model, is
bound by decoding, not by the GPU. Here the decode workers only read files (and parse a JPEG's header for its
format, colour mode and EXIF orientation); ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes the batch
and data/gpu_transform.py resizes, crops and normalises it with the model's own settings.

Anything that is not a plain RGB or greyscale JPEG (PNG, CMYK, ...) and any JPEG nvJPEG refuses takes the CPU path
(data.images.decode_image + the model's preprocess), file by file, and joins the batch in its input position.

Decoding and the transform run on a stream of their own, idle when nvJPEG is called. torchvision allocates nvJPEG's
outputs on the caller's current stream but writes them from a private stream that waits for nothing (and nvJPEG's
hardware engine ignores stream order anyway), while the caching allocator hands out a block as soon as it is freed
on its stream: called on the compute stream, the decoder overwrote activations that queued forward kernels had yet
to read (NaN embeddings in `evaluate`, once the host ran a few batches ahead of the GPU). On an idle stream of our
own, every block it can be given is either finished with or held for the compute stream by record_stream.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from siglip_dola.data.gpu_transform import GpuPreprocess, map_preprocess
from siglip_dola.data.images import ImageReadError, decode_image

DECODES = ("cpu", "gpu")
_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
PREFETCH_BATCHES = 4   # batches each worker reads ahead (bytes only: small)


def check_decode(decode, device) -> None:
    """ValueError unless decode is 'cpu' or 'gpu', and 'gpu' only with a CUDA device."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {list(DECODES)}, got {decode!r}")
    if decode == "gpu" and torch.device(device).type != "cuda":
        raise ValueError(f"decode='gpu' needs the model on a CUDA device (it is on {torch.device(device)}): nvJPEG "
                         "decodes on the GPU; use decode='cpu' here")


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation (1-8) of a JPEG that nvJPEG can decode to RGB (mode RGB or L), else None."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:   # the header only: no pixels are decoded here
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - an unreadable header: the CPU path reports it
        return None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as PIL's ImageOps.exif_transpose shows it (2: mirror, 3: 180, 4: flip, 5: transpose,
    6: 90 clockwise, 7: transverse, 8: 90 counter-clockwise)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


class _JpegFiles(Dataset):
    """Item i -> (i, id, payload): ("jpeg", bytes uint8 [n], orientation), ("pixels", the CPU path's [3, H, W]),
    or the error as text."""

    def __init__(self, items: Sequence, preprocess: Callable):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path = self.items[index]
        try:
            if Path(path).is_dir():
                raise ImageReadError(path, "IsADirectoryError: a folder, not an image file")
            data = Path(path).read_bytes()
            orientation = jpeg_orientation(data)
            if orientation is None:
                return index, str(path), ("pixels", decode_image(path, self.preprocess))
            return index, str(path), ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)
        except ImageReadError as err:
            return index, str(path), err.reason
        except Exception as err:  # noqa: BLE001 - one bad file must not end the pass
            return index, str(path), f"{type(err).__name__}: {err}"


def _rows(rows):
    return rows


def _nvjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, h, w] per JPEG on `device` (None where it failed): the batch in one call, one by one on failure."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torchvision points to TorchCodec; the op is the same
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded = []
            for one in data:
                try:
                    decoded.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=device)[0])
                except RuntimeError:
                    decoded.append(None)
            return decoded


def _assemble(rows, items, transform: GpuPreprocess, preprocess, device: torch.device, stream=None):
    """One batch's rows -> (indices, ids, pixels fp32 [B, 3, H, W] on device or None, skipped, size).

    stream: the decode stream (CUDA; None on CPU). Everything runs on it once it is idle; the pixels come back
    ready on the caller's current stream."""
    caller = torch.cuda.current_stream(device) if stream is not None else None
    if stream is not None:
        stream.synchronize()   # the last batch's transform: no freed block of this stream is still being read
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        result = _decode_and_transform(rows, items, transform, preprocess, device)
    if stream is not None and result[2] is not None:
        caller.wait_stream(stream)
        result[2].record_stream(caller)   # made on the decode stream, read on the caller's
    return result


def _decode_and_transform(rows, items, transform: GpuPreprocess, preprocess, device: torch.device):
    jpegs = [row for row in rows if isinstance(row[2], tuple) and row[2][0] == "jpeg"]
    decoded = _nvjpeg([row[2][1] for row in jpegs], device) if jpegs else []
    on_gpu, pixels_of = [], {}
    for row, image in zip(jpegs, decoded):
        if image is None:   # nvJPEG refused it: the CPU path, in this process
            try:
                pixels_of[row[0]] = decode_image(items[row[0]], preprocess)
            except Exception as err:  # noqa: BLE001
                pixels_of[row[0]] = getattr(err, "reason", f"{type(err).__name__}: {err}")
        else:
            on_gpu.append((row[0], apply_orientation(image, row[2][2])))
    for row in rows:
        if isinstance(row[2], str):
            pixels_of[row[0]] = row[2]
        elif row[2][0] == "pixels":
            pixels_of[row[0]] = row[2][1]
    gpu_pixels = transform([image for _, image in on_gpu]) if on_gpu else None   # (n_gpu, 3, H, W) fp32
    gpu_position = {index: k for k, (index, _) in enumerate(on_gpu)}
    good = [row for row in rows if row[0] in gpu_position or isinstance(pixels_of.get(row[0]), torch.Tensor)]
    skipped = [(row[1], pixels_of[row[0]]) for row in rows if isinstance(pixels_of.get(row[0]), str)]
    if not good:
        return [], [], None, skipped, len(rows)
    if len(on_gpu) == len(good):
        pixels = gpu_pixels
    else:
        first = pixels_of[next(row[0] for row in good if row[0] not in gpu_position)]
        pixels = torch.empty((len(good), *first.shape), dtype=torch.float32, device=device)
        for k, row in enumerate(good):
            source = gpu_pixels[gpu_position[row[0]]] if row[0] in gpu_position else pixels_of[row[0]]
            pixels[k].copy_(source)
    return [row[0] for row in good], [row[1] for row in good], pixels, skipped, len(rows)


def iter_gpu_decoded(items: Sequence, preprocess, batch_size: int, workers: int,
                     device: torch.device) -> Iterator[tuple[list[int], list[str], torch.Tensor | None, list, int]]:
    """(indices, ids, pixels fp32 [B, 3, H, W] on `device` or None, skipped [(id, error)], items consumed) per batch
    of image paths, in input order. `device` is CUDA in use; a CPU device runs the same steps with the CPU decoder
    (the tests)."""
    transform = map_preprocess(preprocess)
    if not all(isinstance(item, (str, os.PathLike)) for item in items[:1]):
        raise TypeError("decode='gpu' reads image files: items must be paths")
    loader = DataLoader(_JpegFiles(items, preprocess), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_rows, prefetch_factor=PREFETCH_BATCHES if workers else None)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for rows in loader:
        yield _assemble(rows, items, transform, preprocess, device, stream)
