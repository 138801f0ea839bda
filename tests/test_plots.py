"""Layer-lens plots: three readable PNGs written atomically from an evaluation report."""
import numpy as np
import pytest
from PIL import Image

from siglip_dola.evaluation import plots


def _report(counts, mean_jsd_scale=0.05):
    layers = list(range(1, 25))
    return {"dataset": "shapes", "model": "tiny", "split": "test", "n_images": 40, "task": "zeroshot_classification",
            "modes": {"off": {"settings": {"layers": []}, "metrics": {"acc1": 0.7}},
                      "static": {"settings": {"layers": [2]}, "metrics": {"acc1": 0.72}},
                      "dynamic": {"settings": {"layers": [18, 20, 22]}, "metrics": {"acc1": 0.74}}},
            "metrics": {"acc1": 0.7},
            "layer_lens": {"metric": "acc1", "layers": layers, "top1": [j / 30 for j in layers], "baseline_top1": 0.7,
                           "dynamic_layer_counts": counts, "jsd_layers": layers[:-1],
                           "mean_jsd": [mean_jsd_scale * (24 - j) / 24 for j in layers[:-1]]}}


@pytest.mark.parametrize("counts,scale", [({"18": 30, "22": 10}, 0.05), ({}, 0.6)])
def test_three_pngs_with_content(tmp_path, counts, scale):
    paths = plots.plot_layer_lens(_report(counts, scale), tmp_path / "plots")
    assert [p.name for p in paths] == ["layer_accuracy.png", "chosen_layers.png", "mean_jsd.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (960, 540)
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 10  # lines, labels and titles drawn, not a blank canvas
        assert (pixels < 100).mean() > 0.005


def test_plots_differ_with_the_data(tmp_path):
    first = plots.plot_chosen_layers(_report({"18": 40}), tmp_path / "a.png")
    second = plots.plot_chosen_layers(_report({"22": 40}), tmp_path / "b.png")
    with Image.open(first) as a, Image.open(second) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
