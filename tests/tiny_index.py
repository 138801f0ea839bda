"""What the retrieval tests share: a tiny random SigLIP saved to a folder, random images, and the index vectors
computed from the model's own modules (the reference the stored vectors are checked against)."""
import numpy as np
import torch
from PIL import Image


def save_tiny_siglip(folder, seed=0):
    """A random-init tiny HF SiglipModel (6 vision layers, width 16, 64 px) + tokenizer saved to `folder`."""
    from transformers import SiglipModel

    from tools import train_embedded

    torch.manual_seed(seed)
    tokenizer = train_embedded.build_tokenizer()
    cfg = train_embedded.TrainConfig(vision_layers=6, text_layers=1, hidden_size=16, num_heads=2)
    model = SiglipModel(train_embedded.build_model_config(cfg, len(tokenizer))).eval()
    train_embedded.save(model, tokenizer, folder)
    return folder


def write_images(folder, n, seed=0, corrupt=()):
    """n random 40x40 PNGs img_XX.png in `folder`, plus the named corrupt files; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    for name in corrupt:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def reference_vectors(model, paths, layers):
    """[n, 1+J, D] normalised: the model's own image embedding, then block j's output through its own head."""
    vision = model.model.vision_model
    pixels = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states  # [emb, block 1, ...]
        final = model.model.get_image_features(pixel_values=pixels)
        final = getattr(final, "pooler_output", final)
        rows = [final] + [vision.head(vision.post_layernorm(hidden[j])) for j in layers]
    stacked = torch.stack(rows, dim=1).double()  # (n, 1+J, D)
    return (stacked / stacked.norm(dim=-1, keepdim=True)).numpy()
