"""Shared fixtures: a tiny random SigLIP of the embedded model's family (12 layers), built once per session."""
import math

import pytest
import torch
from transformers import SiglipModel

from tools import train_embedded as te
from siglip_dola.loading import from_model, load
from naive_dola import naive_layer_probs
from tiny_index import save_tiny_siglip, write_images

TINY_NUM_LAYERS = 12


@pytest.fixture(scope="session")
def tiny_hf_siglip():
    """HF SiglipModel: 12 vision layers of width 16, patch 16, logit scale log(30); eval mode, random init."""
    torch.manual_seed(0)
    cfg = te.TrainConfig(vision_layers=TINY_NUM_LAYERS, text_layers=1, hidden_size=16, num_heads=2, patch_size=16)
    model = SiglipModel(te.build_model_config(cfg, vocab_size=len(te.build_tokenizer()))).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    return model


@pytest.fixture(scope="session")
def tiny_siglip_folder(tiny_hf_siglip, tmp_path_factory):
    """The tiny model saved as a local HF folder that `load()` reads: safetensors weights, tokenizer, processor."""
    folder = tmp_path_factory.mktemp("tiny_siglip")
    tiny_hf_siglip.save_pretrained(folder, safe_serialization=True)
    te.build_tokenizer().save_pretrained(folder)
    te.build_image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_loaded(tiny_hf_siglip):
    """The tiny model as a LoadedModel (id "tiny"), with the embedded model's tokenizer and preprocessing."""
    return from_model(tiny_hf_siglip, preprocess=te.build_image_processor(), tokenizer=te.build_tokenizer(),
                      model_id="tiny")


class CountingReadout:
    """Forwards to a real readout and counts its calls; raises KeyboardInterrupt on call `fail_at`."""

    def __init__(self, readout, fail_at=None):
        self.readout, self.calls, self.fail_at = readout, 0, fail_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.readout(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.readout, name)


@pytest.fixture(scope="module")
def naive(tiny_hf_siglip, tiny_loaded):
    """Per test-split shapes image {layer j: q_j} (j = 1..N) from the model's own modules and numpy, plus labels."""
    return naive_layer_probs(tiny_hf_siglip, tiny_loaded)


# ---------------------------------------------------------------- the retrieval tests' tiny model and images
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random SigLIP (6 vision layers, width 16, 64 px) saved as a folder `load()` reads."""
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(scope="module")
def model(tiny_dir):
    """`tiny_dir` loaded on the CPU."""
    return load(tiny_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 7 random 40x40 PNGs and one corrupt file, broken.png."""
    return write_images(tmp_path_factory.mktemp("images"), 7, corrupt=["broken.png"])
