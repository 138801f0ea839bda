"""Layer-lens plots (matplotlib, Agg): per-layer top-1, chosen-layer histogram, mean JSD per layer."""
from __future__ import annotations

import math
import os
from pathlib import Path

from siglip_dola.dependencies import require
from siglip_dola.io import atomic_path
from siglip_dola.modes import CONTRASTING

matplotlib = require("matplotlib", "plots", "`eval --plots`")
matplotlib.use("Agg")  # files only, never a window; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

_FIGSIZE = (8, 4.5)
LN2 = math.log(2.0)


def _title(report: dict, what: str) -> str:
    return f"{what}\n{report['model']} on {Path(report['dataset']).name} ({report['split']}, n={report['n_images']})"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_layer_accuracy(report: dict, path: Path) -> Path:
    """Line: top-1 of each layer read out alone, with the final layer (baseline) and DoLa modes as lines."""
    lens = report["layer_lens"]
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    ax.plot(lens["layers"], lens["top1"], marker="o", color="tab:blue", label="layer read out alone")
    ax.axhline(lens["baseline_top1"], color="gray", linestyle="--", label=f"final layer (off) {lens['baseline_top1']:.3f}")
    key = lens["metric"]
    for mode, colour in zip(CONTRASTING, ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")):
        if mode not in report["modes"]:
            continue
        value = report["modes"][mode]["metrics"][key]
        ax.axhline(value, color=colour, linestyle=":", label=f"DoLa {mode} {value:.3f}")
    ax.set(xlabel="layer j (output of block j)", ylabel=key, ylim=(0, 1.02),
           title=_title(report, f"Layer lens: {key} of each layer alone"))
    ax.set_xticks(lens["layers"][::2] if len(lens["layers"]) > 16 else lens["layers"])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_chosen_layers(report: dict, path: Path) -> Path:
    """Bars: how many images dynamic mode contrasted with each layer."""
    counts = report["layer_lens"]["dynamic_layer_counts"]
    candidates = report.get("modes", {}).get("dynamic", {}).get("layers", [])
    layers = sorted({int(j) for j in counts} | set(candidates))  # unchosen candidates show as empty bars
    values = [counts.get(str(j), 0) for j in layers]
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    bars = ax.bar([str(j) for j in layers], values, color="tab:green")
    ax.bar_label(bars, labels=[f"{v / max(sum(values), 1):.0%}" for v in values], fontsize=8)
    ax.set(xlabel=f"premature layer M chosen (max JSD) among candidates {candidates}", ylabel="images",
           title=_title(report, "Dynamic DoLa: distribution of chosen layers"))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_mean_jsd(report: dict, path: Path) -> Path:
    """Line: mean JSD(q_N || q_j) per layer j, with ln 2 (the maximum) marked."""
    lens = report["layer_lens"]
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    ax.plot(lens["jsd_layers"], lens["mean_jsd"], marker="o", color="tab:purple", label="mean JSD")
    if max(lens["mean_jsd"], default=0) > 0.35:  # only then is the maximum close enough to be worth a line
        ax.axhline(LN2, color="gray", linestyle="--", label="ln 2 (maximum)")
    ax.set_ylim(bottom=0)
    ax.set(xlabel="layer j (output of block j)", ylabel="mean JSD(q_N || q_j) [nats]",
           title=_title(report, "How far each layer's distribution is from the final one"))
    ax.set_xticks(lens["jsd_layers"][::2] if len(lens["jsd_layers"]) > 16 else lens["jsd_layers"])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_layer_lens(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write the three layer-lens PNGs of an evaluation report into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_layer_accuracy(report, out_dir / "layer_accuracy.png"),
            plot_chosen_layers(report, out_dir / "chosen_layers.png"),
            plot_mean_jsd(report, out_dir / "mean_jsd.png")]
