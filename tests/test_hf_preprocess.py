"""loading/hf.py's image processor wrappers on the INSTALLED transformers release (CI runs the suite on the lowest and
the newest supported one): PIL images of every shape come out as the processor's own settings say.

Regression: on transformers 5.17 every image failed inside the processor ("The size of tensor a (500) must match
the size of tensor b (3)"), because ``input_data_format="channels_last"`` was passed with a PIL image.
The reference is independent of the processor's code: a one-colour image stays that colour through any resize and
crop, so channel c must equal (colour_c * rescale_factor - mean_c) / std_c, with the processor's own settings; a
left-to-right ramp must stay one (a transposed or channels-first reading breaks it).
"""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from siglip_dola.loading.hf import HFImagePreprocess, NaFlexPreprocess

COLOUR = (255, 0, 128)
# (height, width): a photo, its transpose, and the 1- and 3-pixel-high images a guessed layout reads as channels-first
SHAPES = [(500, 375), (375, 500), (1, 7), (3, 9), (3, 3), (40, 64)]
PROCESSORS = {
    "siglip": lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
    "clip": lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
}


def _expected_colour(processor) -> torch.Tensor:
    colour = torch.tensor(COLOUR, dtype=torch.float64) * processor.rescale_factor
    return (colour - torch.tensor(processor.image_mean, dtype=torch.float64)) / torch.tensor(processor.image_std,
                                                                                            dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_one_colour_image_of_any_shape_keeps_its_colour(name, shape):
    processor = PROCESSORS[name]()
    pixels = HFImagePreprocess(processor)(Image.new("RGB", shape[::-1], COLOUR))
    assert pixels.shape == (3, 32, 32), transformers.__version__
    want = _expected_colour(processor).to(pixels.dtype)[:, None, None].expand_as(pixels)
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-5)


def test_left_to_right_ramp_is_not_transposed():
    ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (40, 64, 3))
    pixels = HFImagePreprocess(PROCESSORS["siglip"]())(Image.fromarray(np.ascontiguousarray(ramp)))
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, pixels[:, :1, :].expand_as(pixels), rtol=0, atol=1e-5)  # rows equal
    assert bool((pixels[0, 0, 1:] > pixels[0, 0, :-1]).all())                                    # rising left to right


def test_grayscale_and_rgba_images_become_rgb():
    processor = PROCESSORS["siglip"]()
    for image in (Image.new("L", (7, 1), 128), Image.new("RGBA", (9, 3), (*COLOUR, 7))):
        pixels = HFImagePreprocess(processor)(image)
        assert pixels.shape == (3, 32, 32) and bool(torch.isfinite(pixels).all())


@pytest.mark.skipif(not hasattr(transformers, "Siglip2ImageProcessor"),
                    reason=f"transformers {transformers.__version__} has no Siglip2ImageProcessor (4.50+)")
@pytest.mark.parametrize("shape", SHAPES)
def test_naflex_patches_keep_the_colour(shape):
    processor = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    packed = NaFlexPreprocess(processor)(Image.new("RGB", shape[::-1], COLOUR))       # (1 + 16, 8*8*3)
    assert packed.shape == (17, 192)
    rows, cols = (int(v) for v in packed[0, :2])
    assert 1 <= rows * cols <= 16 and (rows >= cols) == (shape[0] >= shape[1])    # the grid follows the image
    patches = packed[1:1 + rows * cols].reshape(rows * cols, 64, 3)               # (P, p*p, C): channels last
    want = _expected_colour(processor).to(packed.dtype)
    torch.testing.assert_close(patches, want.expand_as(patches), rtol=0, atol=1e-5)
