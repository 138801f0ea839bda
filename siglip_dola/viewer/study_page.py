"""The study view: one offline HTML page over a study's result JSON files, the forest plot a paper would show
(one row per dataset: delta of the chosen mode vs off, its paired interval, McNemar p) and the table beside it."""
from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from siglip_dola.io import write_text_atomic
from siglip_dola.viewer.forest import forest_plot
from siglip_dola.viewer.report import static_text
from siglip_dola.viewer.report_data import read_result
from siglip_dola.modes import BASELINE, DEFAULT

STUDY_CSS = """
.forest { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
.forest .fh { font-size: 12px; font-weight: 600; fill: #1d2430; } .forest .flabel { font-size: 12px; fill: #1d2430; }
.forest .fnum, .forest .fmode { font-size: 12px; fill: #1d2430; font-variant-numeric: tabular-nums; }
.forest .fgrid { stroke: #eef1f5; } .forest .zero { stroke: #5f6b7a; stroke-dasharray: 4 3; }
.forest .ci { stroke: var(--hi); stroke-width: 2.5; } .forest .ci.kept { stroke: #9aa7b8; }
.forest .pt { fill: var(--hi); } .forest .pt.hollow { fill: #fff; stroke: #5f6b7a; stroke-width: 2; }
.forest .frow:hover { font-weight: 600; } .forest .tick { font-size: 10px; fill: var(--muted); }
.forest .axis { font-size: 11px; fill: var(--muted); } .study td { white-space: nowrap; }
.study td:last-child { white-space: normal; word-break: break-all; }
"""


def study_row(result: dict) -> dict:
    """One dataset's row: the chosen mode's paired delta vs off (dynamic's, hollow, where off was kept)."""
    chosen = result.get("chosen_mode", BASELINE)
    paired = result.get("paired") or {}
    shown = chosen if chosen != BASELINE else (DEFAULT if DEFAULT in paired else None)
    entry = paired.get(shown) or {}
    metric = entry.get("metric") or next((p.get("metric") for p in paired.values()), "acc1")
    off_value = ((result.get("modes") or {}).get(BASELINE) or {}).get("metrics", {}).get(metric)
    return {"label": str(result.get("dataset")), "task": result.get("task"), "metric": metric,
            "n": result.get("n_images"), "split": result.get("split"), "off": off_value,
            "chosen_mode": chosen, "mode": shown, "value": entry.get("value"),
            "delta": entry.get("delta"), "ci_low": entry.get("ci_low"), "ci_high": entry.get("ci_high"),
            "confidence": entry.get("confidence", 0.95), "mcnemar_p": entry.get("mcnemar_p"),
            "calibrated_on": (result.get("calibrated_on") or {}).get("split"),
            "mode_label": chosen + (f" ({shown} shown)" if chosen == BASELINE and shown else ""),
            "interval": (None if entry.get("delta") is None else
                         f"{entry['delta']:+.4f} [{entry['ci_low']:+.4f}, {entry['ci_high']:+.4f}]"),
            "title": f"{shown or 'off'} {metric} {entry.get('value')} vs off {off_value}"}


def study_rows(results: list[dict]) -> list[dict]:
    return [study_row(result) for result in results]


def _fmt(value, spec: str = ".4f") -> str:
    return "–" if value is None else (format(value, spec) if isinstance(value, float) else escape(str(value)))


def _table(rows: list[dict], files: list[str]) -> str:
    head = ("<tr><th>dataset</th><th>task</th><th>metric</th><th>n</th><th>calibrated on</th><th>off</th>"
            "<th>chosen</th><th>value</th><th>Δ [CI]</th><th>McNemar p</th><th>result</th></tr>")
    body = []
    for row, file in zip(rows, files):
        body.append(f'<tr><td>{escape(row["label"])}</td><td>{_fmt(row["task"])}</td><td>{_fmt(row["metric"])}</td>'
                    f'<td>{_fmt(row["n"])}</td><td>{_fmt(row["calibrated_on"])}</td><td>{_fmt(row["off"])}</td>'
                    f'<td>{escape(row["mode_label"])}</td><td>{_fmt(row["value"])}</td><td>{row["interval"] or "–"}</td>'
                    f'<td>{_fmt(row["mcnemar_p"], ".2g")}</td><td><a href="{escape(file)}">{escape(Path(file).name)}</a></td></tr>')
    return f'<table class="summary study"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def render_study(results: list[dict], files: list[str]) -> str:
    """The study page's HTML from checked result dicts and the (relative) paths of their files."""
    rows = study_rows(results)
    models = sorted({str(r.get("model")) for r in results})
    metrics = sorted({row["metric"] for row in rows})
    confidence = rows[0]["confidence"] if rows else 0.95
    plots = "".join(f"<figure>{forest_plot([r for r in rows if r['metric'] == m], m, confidence)}</figure>"
                    for m in metrics)
    facts = "".join(f'<div class="fact"><span>{escape(k)}</span><b>{escape(str(v))}</b></div>' for k, v in
                    (("model", ", ".join(models)), ("datasets", len(rows)),
                     ("kept off", sum(r["chosen_mode"] == BASELINE for r in rows))))
    note = ("Each point: the calibrated (chosen) mode minus off on the test items, with its paired bootstrap "
            "interval; hollow: the calibration kept off (Δ = 0 by construction), dynamic mode's Δ shown for reference.")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
            f"<title>siglip-dola study</title><link rel=\"icon\" href=\"data:,\"><style>{static_text('report.css')}"
            f"{STUDY_CSS}</style></head><body data-ready=\"1\"><header><h1>siglip-dola study: {len(rows)} dataset(s)</h1>"
            f"<div class=\"facts\">{facts}</div></header><section id=\"forest\"><h2>Forest plot</h2>{plots}"
            f"<p class=\"src\">{escape(note)}</p></section><section id=\"datasets\"><h2>Datasets</h2>"
            f"{_table(rows, files)}</section></body></html>")


def write_study_page(result_files: list, out: str | os.PathLike) -> Path:
    """Write the study page of these result JSON files to `out` (atomic); links are relative to its folder."""
    out = Path(out)
    results = [read_result(json.loads(Path(f).read_text(encoding="utf-8"))) for f in result_files]
    if not results:
        raise ValueError("a study page needs at least one result JSON")
    links = [os.path.relpath(Path(f).resolve(), out.resolve().parent) for f in result_files]
    write_text_atomic(out, render_study(results, links))
    return out
