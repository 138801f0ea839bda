"""Naive float64 DoLa from the tiny model's own modules (scipy's JSD, numpy softmax), shared by the eval tests."""
import math

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon

from siglip_dola.data import shapes
from siglip_dola.text_bank.build import build_text_bank
from tools import train_embedded as te

NUM_LAYERS, N_IMAGES = 12, 40   # the tiny model's depth (conftest.TINY_NUM_LAYERS); test-split shapes images


def naive_layer_probs(hf_siglip, loaded):
    """Per test-split shapes image {layer j: q_j} (j = 1..N) from the model's own modules and numpy, plus labels."""
    samples = shapes.make_split("test", n=N_IMAGES)
    vision = hf_siglip.vision_model
    with torch.no_grad():
        out = vision(pixel_values=te.pixels_from_images([s.image for s in samples]), output_hidden_states=True)
        z = {j: vision.head(vision.post_layernorm(out.hidden_states[j])).double().numpy()
             for j in range(1, NUM_LAYERS + 1)}
    bank = build_text_bank(loaded, shapes.CLASSNAMES, shapes.TEMPLATES).embeds.double().numpy()
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)

    def probs(v):
        logits = bank @ (v / np.linalg.norm(v)) / loaded.tau
        e = np.exp(logits - logits.max())
        return e / e.sum()
    q = [{j: probs(z[j][i]) for j in z} for i in range(N_IMAGES)]
    return q, np.array([s.label for s in samples])


def naive_ranking(q_image, mode, layers, alpha):
    """Classes best first: DoLa order on the kept head, then the rest by q_N; and the premature layer."""
    q_final = q_image[NUM_LAYERS]
    by_final = sorted(range(len(q_final)), key=lambda c: -q_final[c])
    if mode == "off":
        return by_final, None
    divergences = [jensenshannon(q_final, q_image[j]) ** 2 for j in layers]
    premature = layers[int(np.argmax(divergences))]
    head = [c for c in by_final if q_final[c] >= alpha * q_final.max()]
    head.sort(key=lambda c: -(math.log(q_final[c]) - math.log(q_image[premature][c])))
    return head + [c for c in by_final if c not in head], premature
