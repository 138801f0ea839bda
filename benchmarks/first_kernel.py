"""Host time from the call to the model's first kernel: plain ``encode_image`` vs ``DoLaSigLIP.embed`` (off, dynamic 3).

Each call starts on an idle device (synchronised), so this host time is time the GPU waits, once per call: at
batch 64 it is the part of the wrapper's cost that no kernel work explains. A forward pre-hook on the patch
embedding stamps the clock; medians of --calls calls, interleaved. One run, nothing asserted.

    python benchmarks/first_kernel.py --device cuda --model ViT-L-16-SigLIP-384 --batch 64
    python benchmarks/first_kernel.py --device cpu --quick      # a 2-block timm tower, batch 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import siglip_dola
from benchenv import environment
from norms import randomize_norms


def build(args, device):
    """(loaded model, plain encode function, the module whose pre-hook marks the first kernel)."""
    if args.quick:
        import timm
        tower = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=2,
                                  embed_dim=64, num_heads=2, img_size=32).eval().to(device)
        randomize_norms(tower)
        return siglip_dola.from_model(tower, logit_scale=4.6, precision=args.precision), tower, tower.patch_embed
    import open_clip
    model = open_clip.create_model(args.model, pretrained=None, device=device).eval()
    randomize_norms(model)
    loaded = siglip_dola.from_model(model, precision=args.precision, logit_scale=float(model.logit_scale))
    return loaded, model.encode_image, model.visual.trunk.patch_embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-L-16-SigLIP-384")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded, encode, first = build(args, device)
    stamp = {}
    first.register_forward_pre_hook(lambda module, inputs: stamp.setdefault("first", time.perf_counter()) and None)
    images = torch.randn(args.batch, 3, *loaded.readout.image_size, device=device)
    layers = list(range(2, loaded.readout.num_layers, 2))[-3:] or [loaded.readout.num_layers - 1]
    dtype = loaded.dtype

    def plain(x):
        with torch.inference_mode(), siglip_dola.loading.autocast(device, dtype):
            return encode(x)
    points = {"plain": plain, "off": siglip_dola.DoLaSigLIP(loaded, mode="off").embed,
              "dynamic3": siglip_dola.DoLaSigLIP(loaded, mode="dynamic", layers=layers).embed}
    samples = {name: [] for name in points}
    for round_ in range(args.calls + 5):
        for name, fn in points.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamp.clear()
            start = time.perf_counter()
            fn(images)
            if round_ >= 5:   # warm-up rounds left out
                samples[name].append((stamp["first"] - start) * 1e6)
    print(environment(device))
    for name, values in samples.items():
        print(f"{name:9s} host us before the first kernel: median {statistics.median(values):8.1f}")


if __name__ == "__main__":
    main()
