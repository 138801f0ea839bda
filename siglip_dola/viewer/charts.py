"""Inline SVG bar charts of the layer lens (no plotting library, no script: they render in any browser)."""
from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 460, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 10, 28, 34


def _nice_max(value: float) -> float:
    """Smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (the y-axis top)."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    while value / scale < 1:
        scale /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * scale >= value:
            return step * scale
    return 10 * scale


def bar_chart(xs: list[int], ys: list[float], title: str, y_format: str = "{:.2f}",
              highlight: set[int] | None = None, reference: tuple[str, float] | None = None) -> str:
    """An SVG bar chart of ys [n] over integer xs [n]; `highlight` xs are drawn darker, `reference`
    (label, y) is a dashed horizontal line. Each bar has a <title> tooltip with its exact value."""
    if len(xs) != len(ys):
        raise ValueError(f"bar_chart: {len(xs)} x values but {len(ys)} y values")
    highlight = highlight or set()
    top = _nice_max(max([*ys, reference[1] if reference else 0.0, 0.0]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(len(xs), 1)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{LEFT}" y="16" class="chart-title">{escape(title)}</text>']
    for tick in range(5):  # y grid + labels
        value = top * tick / 4
        y = TOP + plot_h - plot_h * tick / 4
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                     f'{escape(y_format.format(value))}</text>')
    label_every = max(1, round(len(xs) / 12))
    for i, (x, y_value) in enumerate(zip(xs, ys)):
        height = plot_h * max(y_value, 0.0) / top
        bar_x = LEFT + i * step + step * 0.15
        css = "bar hi" if x in highlight else "bar"
        parts.append(f'<rect x="{bar_x:.1f}" y="{TOP + plot_h - height:.1f}" width="{step * 0.7:.1f}" '
                     f'height="{height:.1f}" class="{css}"><title>layer {x}: '
                     f'{escape(y_format.format(y_value))}</title></rect>')
        if i % label_every == 0 or x in highlight:
            parts.append(f'<text x="{bar_x + step * 0.35:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle" '
                         f'class="tick">{x}</text>')
    if reference is not None:
        label, value = reference
        y = TOP + plot_h - plot_h * value / top
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="ref"/>')
        parts.append(f'<text x="{WIDTH - RIGHT}" y="16" text-anchor="end" class="ref-label">'  # in the title row:
                     f'- - {escape(label)} {escape(y_format.format(value))}</text>')  # never over a bar
    parts.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle" class="axis">layer</text>')
    parts.append("</svg>")
    return "".join(parts)


def layer_lens_charts(lens: dict, candidates: list[int] | None = None) -> list[str]:
    """The three layer-lens charts: each layer's metric alone, how often dynamic chose each of its
    `candidates` (default: the layers it chose), mean JSD per layer."""
    layers = [int(j) for j in lens["layers"]]
    final = layers[-1]
    metric = lens.get("metric", "acc1")
    charts = [bar_chart(layers, [float(v) for v in lens["top1"]], f"{metric} of each layer read out alone",
                        highlight={final}, reference=("final layer", float(lens["baseline_top1"])))]
    counts = {int(j): int(n) for j, n in lens.get("dynamic_layer_counts", {}).items()}
    if counts:
        candidates = sorted(set(candidates or []) | set(counts))
        charts.append(bar_chart(candidates, [float(counts.get(j, 0)) for j in candidates],
                                "how often dynamic mode chose each layer", y_format="{:.0f}"))
    if lens.get("mean_jsd"):
        charts.append(bar_chart([int(j) for j in lens["jsd_layers"]], [float(v) for v in lens["mean_jsd"]],
                                "mean JSD(q_N || q_j) per layer", y_format="{:.3f}"))
    return charts
