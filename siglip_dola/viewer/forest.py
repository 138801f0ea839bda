"""An inline SVG forest plot: one row per dataset, the paired delta vs off as a point with its interval.

No plotting library and no script, like charts.py: it renders in any browser and prints as drawn.
"""
from __future__ import annotations

from html import escape

from siglip_dola.modes import BASELINE

LABEL_W, PLOT_W, TEXT_W = 260, 360, 460
ROW_H, HEAD_H, FOOT_H = 30, 40, 40


def _axis_limit(rows: list[dict]) -> float:
    """Half-width of the symmetric x-axis: the largest |bound| rounded up to a 1/2/2.5/5 step, at least 0.01."""
    extent = max([0.01] + [abs(v) for r in rows for v in (r.get("ci_low"), r.get("ci_high"), r.get("delta"))
                           if v is not None])
    scale = 0.001
    while True:
        for step in (1, 2, 2.5, 5):
            if step * scale >= extent * 1.05:
                return step * scale
        scale *= 10


def _fmt_p(p) -> str:
    return "–" if p is None else (f"{p:.2g}" if p >= 0.001 else "<0.001")


def forest_plot(rows: list[dict], metric: str, confidence: float = 0.95) -> str:
    """SVG of rows {"label", "delta", "ci_low", "ci_high", "interval", "mcnemar_p", "chosen_mode", "mode_label"}.

    A filled point is the chosen mode's delta; where the calibration kept `off` (delta 0 by definition) the
    row shows the dynamic mode's delta as a hollow point, so the plot still says what DoLa did there."""
    limit = _axis_limit(rows)
    width, height = LABEL_W + PLOT_W + TEXT_W, HEAD_H + ROW_H * len(rows) + FOOT_H
    x = lambda value: LABEL_W + PLOT_W * (value + limit) / (2 * limit)  # noqa: E731
    ci = f"{int(round(100 * confidence))}% CI"
    parts = [f'<svg class="forest" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="forest plot: delta {escape(metric)} vs off per dataset" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="8" y="24" class="fh">dataset</text>',
             f'<text x="{x(0):.1f}" y="24" text-anchor="middle" class="fh">Δ {escape(metric)} vs off</text>',
             f'<text x="{LABEL_W + PLOT_W + 12}" y="24" class="fh">Δ [{ci}]</text>',
             f'<text x="{LABEL_W + PLOT_W + 220}" y="24" class="fh">McNemar p</text>',
             f'<text x="{LABEL_W + PLOT_W + 312}" y="24" class="fh">mode</text>']
    bottom = HEAD_H + ROW_H * len(rows)
    for tick in (-limit, -limit / 2, 0.0, limit / 2, limit):
        parts.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{HEAD_H - 6}" y2="{bottom}" '
                     f'class="{"zero" if tick == 0 else "fgrid"}"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{bottom + 16}" text-anchor="middle" class="tick">{"0" if tick == 0 else format(tick, "+.3g")}</text>')
    parts.append(f'<text x="{x(0):.1f}" y="{bottom + 34}" text-anchor="middle" class="axis">'
                 f'← off better · DoLa better →</text>')
    for i, row in enumerate(rows):
        y = HEAD_H + ROW_H * i + ROW_H / 2
        kept_off = row["chosen_mode"] == BASELINE
        label = escape(row["label"] if len(row["label"]) <= 34 else "…" + row["label"][-33:])
        parts.append(f'<g class="frow" data-dataset="{escape(row["label"])}" data-delta="{row.get("delta")}">'
                     f'<title>{escape(row["label"])}: {escape(row.get("title", ""))}</title>')
        parts.append(f'<text x="8" y="{y + 4:.1f}" class="flabel">{label}</text>')
        if row.get("delta") is not None:
            if row.get("ci_low") is not None:
                parts.append(f'<line x1="{x(row["ci_low"]):.1f}" x2="{x(row["ci_high"]):.1f}" y1="{y:.1f}" '
                             f'y2="{y:.1f}" class="ci{" kept" if kept_off else ""}"/>')
            parts.append(f'<circle cx="{x(row["delta"]):.1f}" cy="{y:.1f}" r="5" '
                         f'class="pt{" hollow" if kept_off else ""}"/>')
        parts.append(f'<text x="{LABEL_W + PLOT_W + 12}" y="{y + 4:.1f}" class="fnum">{row["interval"] or "–"}</text>'
                     f'<text x="{LABEL_W + PLOT_W + 220}" y="{y + 4:.1f}" class="fnum">{_fmt_p(row.get("mcnemar_p"))}</text>'
                     f'<text x="{LABEL_W + PLOT_W + 312}" y="{y + 4:.1f}" class="fmode">{escape(row["mode_label"])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
