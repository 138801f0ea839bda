"""`write_report(result, predictions_path, out)`: one self-contained HTML file (no network, no CDN).

The summary and the layer-lens charts are rendered here as static HTML/SVG; the per-image table (or
the retrieval queries) is rendered by the page's own script from embedded JSON, one page of rows at a
time, so 10,000 rows open and filter without building 10,000 DOM rows.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from html import escape
from importlib import resources
from pathlib import Path

from siglip_dola.io import write_text_atomic
from siglip_dola.viewer.charts import layer_lens_charts
from siglip_dola.viewer.report_data import read_predictions, read_result, report_payload
from siglip_dola.viewer.thumbnails import ThumbnailSource


def static_text(name: str) -> str:
    return resources.files("siglip_dola.viewer").joinpath("static", name).read_text(encoding="utf-8")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _settings_text(settings: dict | None) -> str:
    """'layers=[2, 4] (calibration) · alpha=0.2 (flag) ...': each setting with where it came from."""
    if not settings:
        return "–"
    sources = settings.get("sources") or {}
    parts = []
    for key, value in settings.items():
        if key in ("sources", "mode") or value is None:
            continue
        source = f' <span class="src">({escape(str(sources[key]))})</span>' if key in sources else ""
        parts.append(f"{escape(key)}={escape(json.dumps(value))}{source}")
    return " · ".join(parts) or "–"


def _mode_metrics(result: dict, mode: str) -> dict:
    entry = result["modes"].get(mode) or {}
    return entry.get("metrics") or (result.get("metrics") or {}).get(mode) or {}


def _summary_table(result: dict) -> str:
    modes = list(result["modes"])
    keys = list(dict.fromkeys(k for m in modes for k in _mode_metrics(result, m)))
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    rows = []
    for mode in modes:
        paired = (result.get("paired") or {}).get(mode) or {}
        interval = (f"{paired['delta']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}]"
                    if {"delta", "ci_low", "ci_high"} <= set(paired) else "–")
        cells = "".join(f"<td>{_fmt(_mode_metrics(result, mode).get(k))}</td>" for k in keys)
        chosen = ' <span class="badge">chosen</span>' if mode == result.get("chosen_mode") else ""
        settings = (result["modes"][mode] or {}).get("settings")
        rows.append(f'<tr data-mode="{escape(mode)}"><th>{escape(mode)}{chosen}</th>{cells}<td>{interval}</td>'
                    f'<td>{_fmt(paired.get("mcnemar_p"))}</td><td class="fixed">{_fmt(paired.get("fixed"))}</td>'
                    f'<td class="broken">{_fmt(paired.get("broken"))}</td><td class="settings">{_settings_text(settings)}</td></tr>')
    metric = next((p.get("metric") for p in (result.get("paired") or {}).values() if p), keys[0] if keys else "")
    confidence = next((p.get("confidence") for p in (result.get("paired") or {}).values() if p), 0.95)
    return (f'<table class="summary"><thead><tr><th>mode</th>{head}<th>Δ {escape(str(metric))} vs off '
            f'[{int(round(100 * confidence))}% CI]</th><th>McNemar p</th><th>fixed</th><th>broken</th>'
            f'<th>settings (source)</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _facts(result: dict, n_rows: int) -> str:
    facts = [("model", result.get("model")), ("pretrained", result.get("pretrained")),
             ("dataset", result.get("dataset")), ("split", result.get("split")), ("task", result.get("task")),
             ("images", result.get("n_images")), ("rows in this report", n_rows),
             ("skipped", len(result.get("skipped") or []))]
    reference = (result.get("reference") or {}).get("best_single_layer")
    if reference:
        value = next(iter((reference.get("metrics") or {}).values()), None)
        facts.append(("best single layer (not DoLa)", f"layer {reference.get('layer')}: {_fmt(value)}"))
    return "".join(f'<div class="fact"><span>{escape(k)}</span><b>{_fmt(v)}</b></div>'
                   for k, v in facts if v is not None)


def _embed_json(payload: dict) -> str:
    """JSON safe inside <script type="application/json">: no '</' can close the element early."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def render_report(result: dict, payload: dict, problems: list[str], missing_thumbs: int) -> str:
    """The report's HTML text from a checked result and its payload."""
    n_rows = len(payload.get("id") or payload.get("query") or [])
    notes = [escape(p) for p in problems[:20]]
    if len(problems) > 20:
        notes.append(f"... and {len(problems) - 20} more bad lines")
    if missing_thumbs:
        notes.append(f"{missing_thumbs} images could not be found or decoded: shown as grey placeholders")
    lens = result.get("layer_lens")
    dynamic = ((result["modes"].get("dynamic") or {}).get("settings") or {}).get("layers")
    charts = "".join(f'<figure>{svg}</figure>' for svg in layer_lens_charts(lens, dynamic)) if lens else \
        "<p>This result has no layer lens.</p>"
    title = f"siglip-dola report: {result.get('model')} on {result.get('dataset')} [{result.get('split')}]"
    parts = {"TITLE": escape(title), "CSS": static_text("report.css"), "FACTS": _facts(result, n_rows),
             "SUMMARY": _summary_table(result), "NOTES": "".join(f"<li>{n}</li>" for n in notes),
             "CHARTS": charts, "DATA": _embed_json(payload), "JS": static_text("report.js")}
    # one pass over the template: text substituted in (class names, ids) is never scanned for markers
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda match: parts[match.group(1)], static_text("report.html"))


def write_report(result, predictions_path: str | os.PathLike, out: str | os.PathLike,
                 thumb_size: int = 64, image_root: str | os.PathLike | None = None,
                 bad_lines: list | None = None) -> Path:
    """Write the HTML report of `result` (Result JSON path or dict) and its Predictions JSONL to `out`.

    Thumbnails (JPEG, at most thumb_size px, <= 96) come from the prediction ids: image files, else
    the result's dataset + split items; `image_root` is a folder to look for moved files by name.
    Lines of the predictions that are not records are left out, named in the page and in a UserWarning,
    and appended to `bad_lines` when a list is given (the CLI's exit status counts them).
    """
    result = read_result(result)
    records, problems = read_predictions(predictions_path)
    if problems:
        from siglip_dola.failures import first_few

        warnings.warn(f"{len(problems)} line(s) of {str(predictions_path)!r} are not prediction records and are "
                      f"left out: {first_few(problems, 3)}", UserWarning, stacklevel=2)
        if bad_lines is not None:
            bad_lines.extend(problems)
    thumbs = ThumbnailSource(result.get("dataset"), result.get("split"), thumb_size,
                             None if image_root is None else str(image_root))
    payload = report_payload(result, records, thumbs, problems)
    html = render_report(result, payload, problems, len(thumbs.missing))
    out = Path(out)
    write_text_atomic(out, html)  # the usual mode (a report is for sharing), never a chmod of a device node
    return out
