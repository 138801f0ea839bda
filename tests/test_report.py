"""`siglip-dola report` / `write_report`: the HTML report, checked as data and in headless Chromium.

Fixtures follow the Result JSON and Predictions JSONL contracts of docs/viewer.md exactly; their
expected outcomes are decided while they are built, independently of the report's own code.
"""
import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from siglip_dola.cli import main
from siglip_dola.data import shapes
from siglip_dola.viewer import write_report
from browser import Chromium

OUTCOME_PLAN = ["fixed"] * 5 + ["broken"] * 3 + ["both right"] * 10 + ["both wrong"] * 12  # 30 rows


def _distribution(rng, n_classes, top):
    """A probability vector [C] whose argmax is `top`."""
    p = rng.dirichlet(np.ones(n_classes) * 0.3)
    p[top] = p.max() + 0.05
    return p / p.sum()


def _top5(p):
    order = np.argsort(-p, kind="stable")[:5]
    return [{"label": shapes.CLASSNAMES[i], "index": int(i), "prob": float(p[i])} for i in order]


def classification_records(ids, plan, seed=0):
    """Predictions JSONL records (contract layout) whose off / dynamic top-1 follow `plan`."""
    rng = np.random.default_rng(seed)
    n_classes = len(shapes.CLASSNAMES)
    records = []
    for i, (item_id, outcome) in enumerate(zip(ids, plan)):
        label = i % n_classes
        wrong = (label + 1 + int(rng.integers(n_classes - 1))) % n_classes
        off_right = outcome in ("broken", "both right")
        dola_right = outcome in ("fixed", "both right")
        off = _distribution(rng, n_classes, label if off_right else wrong)
        dyn = _distribution(rng, n_classes, label if dola_right else wrong)
        sta = _distribution(rng, n_classes, label)
        jsd = {str(j): float(rng.uniform(0, 0.5)) for j in (2, 4, 6, 8)}
        layer = int(max(jsd, key=jsd.get))
        records.append({"index": i, "id": item_id, "label": shapes.CLASSNAMES[label], "label_index": label,
                        "modes": {"off": {"top5": _top5(off), "true_prob": float(off[label])},
                                  "static": {"top5": _top5(sta), "true_prob": float(sta[label]),
                                             "premature_layer": 2, "head_set_size": int(rng.integers(1, 9)),
                                             "jsd": {"2": jsd["2"]}},
                                  "dynamic": {"top5": _top5(dyn), "true_prob": float(dyn[label]),
                                              "premature_layer": layer, "head_set_size": int(rng.integers(1, 9)),
                                              "jsd": jsd}}})
    return records


def _settings(mode, layers, static_layer=None):
    return {"mode": mode, "layers": layers, "static_layer": static_layer, "alpha": None if mode == "off" else 0.1,
            "contrast_weight": 1.0, "bucket": None, "n_buckets": None,
            "sources": {"mode": "flag", "layers": "default", "alpha": "default", "contrast_weight": "default"},
            "calibration": None}


def classification_result(records, predictions_path):
    """A Result JSON (contract layout) for `records`."""
    n = len(records)
    acc = {m: sum(r["modes"][m]["top5"][0]["index"] == r["label_index"] for r in records) / n
           for m in ("off", "static", "dynamic")}
    def paired(mode):
        fixed = sum(r["modes"]["off"]["top5"][0]["index"] != r["label_index"] == r["modes"][mode]["top5"][0]["index"]
                    for r in records)
        broken = sum(r["modes"][mode]["top5"][0]["index"] != r["label_index"] == r["modes"]["off"]["top5"][0]["index"]
                     for r in records)
        delta = acc[mode] - acc["off"]
        return {"metric": "acc1", "off": acc["off"], "value": acc[mode], "delta": delta, "ci_low": delta - 0.05,
                "ci_high": delta + 0.05, "confidence": 0.95, "mcnemar_p": 0.5, "fixed": fixed, "broken": broken,
                "n": n, "n_resamples": 10000, "seed": 0}
    modes = {m: {"settings": _settings(m, [] if m == "off" else [2, 4, 6, 8] if m == "dynamic" else [2],
                                       2 if m == "static" else None),
                 "metrics": {"acc1": acc[m], "acc5": 1.0, "mean_per_class_recall": acc[m]}} for m in acc}
    return {"dataset": "shapes", "model": "embedded", "pretrained": None, "task": "zeroshot_classification",
            "language": "en", "metrics": modes["dynamic"]["metrics"], "split": "test", "n_images": n,
            "chosen_mode": "dynamic", "settings": modes["dynamic"]["settings"], "modes": modes,
            "paired": {"static": paired("static"), "dynamic": paired("dynamic")},
            "reference": {"best_single_layer": {"layer": 12, "metrics": {"acc1": 0.31}, "paired": {},
                                                "note": "a single layer read out alone; not DoLa"}},
            "layer_lens": {"metric": "acc1", "layers": list(range(1, 25)), "top1": [0.1 + 0.01 * j for j in range(24)],
                           "baseline_top1": 0.33, "dynamic_layer_counts": {"2": 10, "4": 8, "6": 7, "8": 5},
                           "jsd_layers": list(range(1, 24)), "mean_jsd": [0.5 - 0.02 * j for j in range(23)]},
            "predictions": str(predictions_path), "skipped": []}


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")


@pytest.fixture(scope="module")
def classification_files(tmp_path_factory):
    """30 rows: 26 image files, 3 shapes dataset ids (thumbnails from the dataset), 1 id found nowhere."""
    root = tmp_path_factory.mktemp("report")
    ids = []
    for i in range(26):
        path = root / f"img_{i:02d}.png"
        shapes.make_sample("test", i).image.save(path)
        ids.append(str(path))
    ids += ["test_0_00026", "test_0_00027", "test_0_00028", str(root / "gone.png")]
    records = classification_records(ids, OUTCOME_PLAN)
    predictions = root / "predictions.jsonl"
    broken_record = dict(records[0], index=98, modes={**records[0]["modes"], "off": {"top5": [], "true_prob": 0.5}})
    write_jsonl(predictions, records, extra_lines=["{not json", '{"index": 99}', json.dumps(broken_record)])
    result = root / "result.json"
    result.write_text(json.dumps(classification_result(records, predictions)))
    return result, predictions, records


def embedded_data(html):
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    return json.loads(match.group(1))


PLAN_CODE = {"both wrong": 0, "fixed": 1, "broken": 2, "both right": 3}


@pytest.fixture(scope="module")
def report_html(classification_files, tmp_path_factory):
    result, predictions, _ = classification_files
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert write_report(result, predictions, out) == out
    return out


def test_rows_carry_the_planned_outcomes_and_the_predictions(report_html, classification_files):
    _, _, records = classification_files
    data = embedded_data(report_html.read_text())
    assert data["mode_order"] == ["dynamic", "static"]  # the chosen mode first
    assert data["modes"]["dynamic"]["outcome"] == [PLAN_CODE[o] for o in OUTCOME_PLAN]
    off_right = [o in ("broken", "both right") for o in OUTCOME_PLAN]
    assert data["modes"]["static"]["outcome"] == [3 if right else 1 for right in off_right]  # static is always right
    for i, record in enumerate(records):
        assert data["label"][i] == record["label_index"]
        assert [c for c, _ in data["off"]["top"][i]] == [e["index"] for e in record["modes"]["off"]["top5"][:3]]
        dynamic = data["modes"]["dynamic"]
        assert dynamic["layer"][i] == record["modes"]["dynamic"]["premature_layer"]
        assert dynamic["head"][i] == record["modes"]["dynamic"]["head_set_size"]
        jsd = record["modes"]["dynamic"]["jsd"]
        assert dynamic["jsd"][i] == pytest.approx([jsd[str(j)] for j in dynamic["jsd_layers"]], abs=1e-4)
        assert data["modes"]["static"]["true_prob"][i] == pytest.approx(record["modes"]["static"]["true_prob"], abs=1e-4)


def test_summary_lists_every_mode_with_its_paired_figures(report_html, classification_files):
    result = json.loads(classification_files[0].read_text())
    html = report_html.read_text()
    summary = html[html.index('<table class="summary">'):html.index("</table>")]
    for mode in ("off", "static", "dynamic"):
        assert f'data-mode="{mode}"' in summary
    dynamic = summary[summary.index('data-mode="dynamic"'):]
    paired = result["paired"]["dynamic"]
    assert f'{result["modes"]["dynamic"]["metrics"]["acc1"]:.4f}' in dynamic
    assert f'{paired["delta"]:+.4f} [{paired["ci_low"]:+.4f}, {paired["ci_high"]:+.4f}]' in dynamic
    assert '<td class="fixed">5</td><td class="broken">3</td>' in dynamic
    assert "layers=[2, 4, 6, 8] <span class=\"src\">(default)</span>" in dynamic
    for fact in ("<b>embedded</b>", "<b>shapes</b>", "<b>test</b>", "layer 12: 0.3100"):
        assert fact in html


def test_thumbnails_are_small_jpegs_from_files_and_the_dataset(report_html, classification_files):
    data = embedded_data(report_html.read_text())
    for i, uri in enumerate(data["thumb"][:29]):  # 26 files + 3 shapes dataset ids
        assert uri.startswith("data:image/jpeg;base64,"), i
        thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 64
        original = shapes.make_sample("test", i).image.resize(thumb.size, Image.Resampling.BOX)
        error = np.abs(np.asarray(thumb, np.float64) - np.asarray(original, np.float64)).mean()
        assert error < 12, (i, error)  # the same picture (JPEG loss only), dataset ids included
    assert data["thumb"][29] is None  # the file that is gone: a placeholder
    assert "1 images could not be found or decoded" in report_html.read_text()


def test_report_file_has_the_usual_mode(report_html):
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert report_html.stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_prediction_lines_are_reported_not_fatal(report_html):
    html = report_html.read_text()
    assert "line 31: not JSON" in html and "line 32: not a prediction record" in html
    assert "record 98: left out" in html and "modes.off.top5 is empty" in html and len(embedded_data(html)["label"]) == 30


def test_report_is_offline_by_construction(report_html):
    html = report_html.read_text()
    assert "default-src 'none'; img-src data:" in html
    urls = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", html)
    assert urls and all(u.startswith("data:") or u.startswith("${") for u in urls), urls
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)


def test_chart_bars_are_proportional_to_the_layer_lens(report_html, classification_files):
    lens = json.loads(classification_files[0].read_text())["layer_lens"]
    svg = report_html.read_text().split("<figure>")[1]
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([0-9.]+)" class="bar', svg)]
    assert len(heights) == 24
    np.testing.assert_allclose(np.array(heights) / heights[-1], np.array(lens["top1"]) / lens["top1"][-1], atol=0.02)


def test_cli_report_and_its_errors(classification_files, tmp_path, capsys):
    result, predictions, _ = classification_files
    out = tmp_path / "r.html"
    # the predictions named by the result; their 3 bad lines are named on stderr and make the exit status 1
    assert main(["report", str(result), "--out", str(out)]) == 1
    assert out.is_file() and "report: " in capsys.readouterr().out
    assert main(["report", str(result), str(predictions), "--out", str(out), "--thumb-size", "200"]) == 2
    assert "--thumb-size must be an integer in [8, 96]" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.json"), str(predictions), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"model": "x"}))
    assert main(["report", str(tmp_path / "bad.json"), str(predictions), "--out", str(out)]) == 2
    assert "result JSON lacks" in capsys.readouterr().err


def _retrieval_files(root):
    """8 text->image queries over 10 shape images; rank-1 gold for off / dynamic planned per query."""
    ids = []
    for i in range(10):
        path = root / f"g_{i}.png"
        shapes.make_sample("test", 40 + i).image.save(path)
        ids.append(str(path))
    plan = ["fixed", "fixed", "broken", "both right", "both right", "both wrong", "both wrong", "both right"]
    records = []
    for q, outcome in enumerate(plan):
        gold = ids[q]
        others = [i for i in ids if i != gold]
        def ranking(right):
            order = [gold] + others[:4] if right else others[:2] + [gold] + others[2:4]
            return [{"id": i, "score": round(1 - 0.1 * r, 3)} for r, i in enumerate(order)]
        records.append({"index": q, "query": f"query {q}", "gold": [gold],
                        "modes": {"off": {"top5": ranking(outcome in ("broken", "both right"))},
                                  "dynamic": {"top5": ranking(outcome in ("fixed", "both right")),
                                              "premature_layer": 2 + 2 * (q % 3)}}})
    predictions = root / "retrieval.jsonl"
    write_jsonl(predictions, records)
    metrics = {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.5}
    result = {"dataset": "shapes", "model": "embedded", "pretrained": None, "task": "zeroshot_retrieval",
              "language": "en", "metrics": metrics, "split": "test", "n_images": 10, "chosen_mode": "dynamic",
              "settings": _settings("dynamic", [2, 4, 6]),
              "modes": {"off": {"settings": _settings("off", []), "metrics": metrics},
                        "dynamic": {"settings": _settings("dynamic", [2, 4, 6]), "metrics": metrics}},
              "paired": {}, "layer_lens": None, "predictions": str(predictions), "skipped": []}
    (root / "retrieval.json").write_text(json.dumps(result))
    return root / "retrieval.json", predictions, plan


def test_retrieval_report_marks_gold_side_by_side(tmp_path):
    result, predictions, plan = _retrieval_files(tmp_path)
    out = write_report(result, predictions, tmp_path / "retrieval.html")
    data = embedded_data(out.read_text())
    assert data["modes"]["dynamic"]["outcome"] == [PLAN_CODE[o] for o in plan]
    assert all(uri and uri.startswith("data:image/jpeg") for uri in data["thumbs"].values())
    with Chromium() as browser:
        browser.open(out.as_uri())
        assert browser.evaluate("document.querySelectorAll('.query').length") == 8
        gold_marks = browser.evaluate("Array.from(document.querySelectorAll('.query')).map("
                                      "q => Array.from(q.querySelectorAll('.ranking')).map("
                                      "r => Array.from(r.querySelectorAll('.hit')).findIndex(h => h.classList.contains('gold'))))")
        right = {"fixed": (False, True), "broken": (True, False), "both right": (True, True), "both wrong": (False, False)}
        assert gold_marks == [[0 if right[o][0] else 2, 0 if right[o][1] else 2] for o in plan]
        browser.open(out.as_uri() + "#outcome=fixed", ready="document.body.dataset.matching === '2'")
        assert browser.evaluate("document.querySelectorAll('.query').length") == 2
        assert browser.errors() == []


def test_report_in_chromium_filters_sorts_and_keeps_url_state(report_html, classification_files):
    _, _, records = classification_files
    delta = [r["modes"]["dynamic"]["true_prob"] - r["modes"]["off"]["true_prob"] for r in records]
    with Chromium() as browser:
        browser.open(report_html.as_uri())
        body = browser.evaluate("document.body.innerText")
        assert "Summary" in body and "Layer lens" in body and "dynamic" in body
        assert browser.evaluate("document.querySelectorAll('#summary tbody tr').length") == 3
        assert browser.evaluate("document.querySelectorAll('svg.chart').length") == 3
        assert browser.evaluate("document.querySelectorAll('tr.row').length") == 30
        # a filter click narrows the rows and lands in the URL
        browser.evaluate("document.querySelector('#f-outcome button[data-v=fixed]').click()")
        assert browser.evaluate("document.querySelectorAll('tr.row').length") == 5
        assert "outcome=fixed" in browser.evaluate("location.hash")
        # URL state alone: broken rows of one premature layer, most hurt first
        layer = records[5]["modes"]["dynamic"]["premature_layer"]
        expected = [i for i, o in enumerate(OUTCOME_PLAN) if o == "broken"
                    and records[i]["modes"]["dynamic"]["premature_layer"] == layer]
        expected.sort(key=lambda i: delta[i])
        browser.open(report_html.as_uri() + f"#outcome=broken&layer={layer}&sort=delta-asc",
                     ready=f"document.body.dataset.matching === '{len(expected)}'")
        shown = browser.evaluate("Array.from(document.querySelectorAll('tr.row')).map(r => +r.dataset.index)")
        assert shown == expected
        assert browser.evaluate("document.getElementById('f-layer').value") == str(layer)
        # true-class filter + sort by gain
        label = records[3]["label_index"]
        browser.open(report_html.as_uri() + f"#cls={label}&sort=delta-desc", ready="document.body.dataset.ready === '1'")
        shown = browser.evaluate("Array.from(document.querySelectorAll('tr.row')).map(r => +r.dataset.index)")
        assert shown == sorted([i for i, r in enumerate(records) if r["label_index"] == label], key=lambda i: -delta[i])
        assert browser.evaluate("document.querySelectorAll('tr.row img').length") >= 1
        assert browser.evaluate("document.querySelectorAll('svg.spark').length") >= 1
        assert browser.errors() == []
        assert all(u.startswith(("file:", "data:")) for u in browser.requested_urls())


def test_large_reports_render_one_page_at_a_time(tmp_path):
    """120 rows: 50 in the DOM, the pager walks to the rest, the page number lands in the URL."""
    ids = [f"missing_{i}" for i in range(120)]  # no image anywhere: placeholders, and the report says so
    plan = [("fixed", "broken", "both right", "both wrong")[i % 4] for i in range(120)]
    records = classification_records(ids, plan, seed=1)
    write_jsonl(tmp_path / "p.jsonl", records)
    result = dict(classification_result(records, tmp_path / "p.jsonl"), dataset=str(tmp_path / "gone.csv"))
    out = write_report(result, tmp_path / "p.jsonl", tmp_path / "big.html")
    assert "120 images could not be found" in out.read_text()
    with Chromium() as browser:
        browser.open(out.as_uri())
        assert browser.evaluate("document.querySelectorAll('tr.row').length") == 50
        assert browser.evaluate("document.querySelectorAll('tr.row .ph').length") == 50
        browser.evaluate("document.getElementById('next').click(); document.getElementById('next').click()")
        assert browser.evaluate("Array.from(document.querySelectorAll('tr.row')).map(r => +r.dataset.index)") == \
            list(range(100, 120))
        assert "page=2" in browser.evaluate("location.hash")
        browser.open(out.as_uri() + "#outcome=broken&page=1", ready="document.body.dataset.matching === '30'")
        # 30 broken rows fit one page: a page past the end clamps to the last one
        assert browser.evaluate("Array.from(document.querySelectorAll('tr.row')).map(r => +r.dataset.index)") == \
            [i for i in range(120) if plan[i] == "broken"]
        assert browser.errors() == []


def test_eval_report_flag_writes_the_page_and_its_rows(tmp_path, capsys):
    result, page = tmp_path / "result.json", tmp_path / "page.html"
    assert main(["eval", "--dataset", "shapes", "--limit", "24", "--out", str(result), "--report", str(page),
                 "--no-progress", "--workers", "0", "--n-resamples", "200"]) == 0
    assert "report: " in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "page.predictions.jsonl").read_text().splitlines()]
    written = json.loads(result.read_text())
    assert len(rows) == written["n_images"] == 24 and written["predictions"].endswith("page.predictions.jsonl")
    html = page.read_text(encoding="utf-8")
    assert all(row["id"] in html for row in rows)   # every image of the run is on the page
    assert main(["eval", "--dataset", "shapes", "--limit", "24", "--out", str(tmp_path / "r2.json"),
                 "--report", str(tmp_path / "page.txt")]) == 2
    assert "--report must name an .html file" in capsys.readouterr().err
    assert not (tmp_path / "r2.json").exists()   # refused before any evaluation ran
