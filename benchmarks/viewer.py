"""Viewer measurements (issue #15): the report's size and open/filter time at 10k rows in headless Chromium,
the search page's latency at 1 and 8 concurrent loopback clients (CPU, embedded model), and the docs/ screenshots.

    python benchmarks/viewer.py report --rows 10000          # synthetic rows, real thumbnails; size + times
    python benchmarks/viewer.py embedded --out DIR --limit 360  # embedded model on shapes test: result + predictions
    python benchmarks/viewer.py latency --clients 1 8 --queries 40
    python benchmarks/viewer.py screenshots                  # docs/report.png, docs/search.png

`embedded` writes the Result JSON + Predictions JSONL of the contract from the evaluation pipeline's own
pieces (embed once, score off / static / dynamic with the shipped calibration), for the screenshots.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _mcnemar_exact(fixed: int, broken: int) -> float:
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _paired(off_right: np.ndarray, right: np.ndarray, resamples: int = 10000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    diff = right.astype(np.float64) - off_right
    boots = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    fixed, broken = int((right & ~off_right).sum()), int((off_right & ~right).sum())
    return {"metric": "acc1", "off": float(off_right.mean()), "value": float(right.mean()), "delta": float(diff.mean()),
            "ci_low": float(np.quantile(boots, 0.025)), "ci_high": float(np.quantile(boots, 0.975)), "confidence": 0.95,
            "mcnemar_p": _mcnemar_exact(fixed, broken), "fixed": fixed, "broken": broken, "n": int(len(diff)),
            "n_resamples": resamples, "seed": seed}


def embedded(out: Path, limit: int | None) -> tuple[Path, Path]:
    """Result JSON + Predictions JSONL (contract layout) of the embedded model on shapes test."""
    import torch

    from siglip_dola.evaluation.calibrate import as_dataset, class_logits, embed_dataset, read_calibration, score_point
    from siglip_dola.evaluation.evaluate import layer_lens, mode_points
    from siglip_dola.evaluation.metrics import classification_metrics, one_hot_targets, rank_scores
    from siglip_dola.loading import embedded as embedded_assets
    from siglip_dola.loading import load

    out.mkdir(parents=True, exist_ok=True)
    model = load(None)
    dataset = as_dataset("shapes", "test", limit)
    embeddings = embed_dataset(model, dataset, 64, progress=False)
    cache = class_logits(model, dataset, embeddings)
    calibration = read_calibration(str(embedded_assets.EMBEDDED_CALIBRATION))
    points = mode_points(model.readout.num_layers, calibration)
    results = {mode: score_point(cache.final, cache.layers, point) for mode, point in points.items()}
    labels = cache.labels
    right = {m: (r.probs.argmax(-1) == labels).numpy() for m, r in results.items()}
    names = dataset.classnames
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for row, (item_index, item_id) in enumerate(zip(embeddings.indices, embeddings.ids)):
            label = int(labels[row])
            modes = {}
            for mode, r in results.items():
                probs = r.probs[row]
                top = torch.argsort(probs, descending=True, stable=True)[:5]
                entry = {"top5": [{"label": names[int(c)], "index": int(c), "prob": float(probs[c])} for c in top],
                         "true_prob": float(probs[label])}
                if mode != "off":
                    layers = points[mode]["layers"]
                    entry.update(premature_layer=int(r.premature_layer[row]), head_set_size=int((probs > 0).sum()),
                                 jsd={str(j): float(r.jsd[k][row]) for k, j in enumerate(layers)})
                modes[mode] = entry
            record = {"index": row, "id": str(item_id), "label": names[label], "label_index": label, "modes": modes}
            handle.write(json.dumps(record) + "\n")
    metrics = {m: classification_metrics(rank_scores(r), labels) for m, r in results.items()}
    targets = one_hot_targets(labels, cache.final.shape[-1])
    lens = layer_lens(cache.final, cache.layers, targets, results["dynamic"], "acc1")
    settings = {m: {**{k: points[m][k] for k in ("mode", "layers", "static_layer", "alpha", "bucket", "n_buckets")},
                    "contrast_weight": 1.0, "sources": {"mode": "calibration", "layers": "calibration",
                                                        "alpha": "calibration", "contrast_weight": "default"},
                    "calibration": "embedded"} for m in points}
    best = int(np.argmax(lens["top1"][:-1])) + 1
    result = {"dataset": "shapes", "model": model.model_id, "pretrained": None, "task": "zeroshot_classification",
              "language": "en", "metrics": metrics["static"], "split": "test", "n_images": len(embeddings.ids),
              "chosen_mode": "static", "settings": settings["static"],
              "modes": {m: {"settings": settings[m], "metrics": metrics[m]} for m in points},
              "paired": {m: _paired(right["off"], right[m]) for m in ("static", "dynamic")},
              "reference": {"best_single_layer": {"layer": best, "metrics": {"acc1": lens["top1"][best - 1]},
                                                  "paired": {}, "note": "a single layer read out alone; not DoLa"}},
              "layer_lens": lens, "predictions": str(out / "predictions.jsonl"), "skipped": []}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return out / "result.json", out / "predictions.jsonl"


def report(rows: int) -> dict:
    """Size and open / filter time of a report of `rows` synthetic rows with distinct real thumbnails."""
    from browser import Chromium
    from siglip_dola.data import shapes
    from siglip_dola.viewer import write_report
    from test_report import classification_records, classification_result, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = []
        for i in range(rows):
            path = tmp / f"img_{i:05d}.png"
            shapes.make_sample("test", i).image.save(path)
            ids.append(str(path))
        plan = [("fixed", "broken", "both right", "both wrong", "both wrong")[i % 5] for i in range(rows)]
        records = classification_records(ids, plan)
        write_jsonl(tmp / "p.jsonl", records)
        (tmp / "r.json").write_text(json.dumps(classification_result(records, tmp / "p.jsonl")))
        started = time.perf_counter()
        out = write_report(tmp / "r.json", tmp / "p.jsonl", tmp / "report.html")
        write_s = time.perf_counter() - started
        with Chromium() as browser:
            started = time.perf_counter()
            browser.open(out.as_uri())
            open_s = time.perf_counter() - started
            first_render_ms = float(browser.evaluate("document.body.dataset.renderMs"))
            filters = {}
            for hash_ in ("outcome=fixed", "outcome=broken&sort=delta-asc", "cls=3&sort=delta-desc", "layer=4&page=3"):
                browser.open(out.as_uri() + "#" + hash_)
                filters[hash_] = float(browser.evaluate("document.body.dataset.renderMs"))
            errors = browser.errors()
        return {"rows": rows, "bytes": out.stat().st_size, "write_s": round(write_s, 2), "open_s": round(open_s, 2),
                "first_render_ms": first_render_ms, "filter_render_ms": filters, "console_errors": errors}


def latency(clients: list[int], queries: int) -> list[dict]:
    """Per-request latency (ms) over uvicorn on loopback at each concurrency; bounded loops of `queries` each."""
    import uvicorn

    from siglip_dola.data import shapes
    from siglip_dola.loading import load
    from siglip_dola.retrieval import build_index
    from siglip_dola.viewer.app import bind, create_app, url_of
    from siglip_dola.viewer.service import SearchService

    words = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in range(200):
            shapes.make_sample("test", i).image.save(tmp / f"s_{i:03d}.png")
        model = load(None)
        build_index(sorted(tmp.glob("*.png")), tmp / "idx", model, progress=False)
        sock = bind("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app(SearchService(tmp / "idx", model)), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        url = url_of(sock)
        while not server.started:
            time.sleep(0.05)

        def one(i: int) -> float:
            q = urllib.parse.urlencode({"q": words[i % len(words)], "k": 10, "rerank_k": 100, "mode": "dynamic"})
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}api/search?{q}", timeout=60) as response:
                assert response.status == 200
                response.read()
            return 1000 * (time.perf_counter() - started)

        for i in range(5):
            one(i)  # warm-up
        rows = []
        for n in clients:
            started = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                times = sorted(pool.map(one, range(queries * n)))
            wall = time.perf_counter() - started
            rows.append({"clients": n, "requests": len(times), "p50_ms": round(statistics.median(times), 1),
                         "p95_ms": round(times[int(0.95 * (len(times) - 1))], 1), "qps": round(len(times) / wall, 1)})
        server.should_exit = True
        thread.join(timeout=10)
        return rows


def screenshots(docs: Path, limit: int) -> None:
    """docs/report.png (embedded model on shapes test) and docs/search.png (a served shapes index)."""
    import uvicorn

    from browser import Chromium
    from siglip_dola.data import shapes
    from siglip_dola.loading import load
    from siglip_dola.retrieval import build_index
    from siglip_dola.viewer import write_report
    from siglip_dola.viewer.app import bind, create_app, url_of
    from siglip_dola.viewer.service import SearchService

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result, predictions = embedded(tmp / "eval", limit)
        out = write_report(result, predictions, tmp / "report.html")
        with Chromium(width=1280, height=1500) as browser:
            browser.open(out.as_uri() + "#mode=dynamic&outcome=fixed")
            browser.screenshot(docs / "report.png", full_page=False)
        for i in range(120):
            shapes.make_sample("test", i).image.save(tmp / f"s_{i:03d}.png")
        model = load(None)
        build_index(sorted(tmp.glob("*.png")), tmp / "idx", model, progress=False)
        sock = bind("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app(SearchService(tmp / "idx", model)), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        with Chromium(width=1280, height=860) as browser:
            browser.open(url_of(sock) + "?q=a+red+circle&k=8&rerank_k=100&mode=dynamic")
            browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            browser.screenshot(docs / "search.png", full_page=True)
        server.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="job", required=True)
    sub.add_parser("report").add_argument("--rows", type=int, default=10000)
    emb = sub.add_parser("embedded")
    emb.add_argument("--out", type=Path, required=True)
    emb.add_argument("--limit", type=int, default=None)
    lat = sub.add_parser("latency")
    lat.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    lat.add_argument("--queries", type=int, default=40, help="requests per client")
    shots = sub.add_parser("screenshots")
    shots.add_argument("--docs", type=Path, default=ROOT / "docs")
    shots.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    if args.job == "report":
        print(json.dumps(report(args.rows), indent=1))
    elif args.job == "embedded":
        print(embedded(args.out, args.limit))
    elif args.job == "latency":
        print(json.dumps(latency(args.clients, args.queries), indent=1))
    else:
        screenshots(args.docs, args.limit)


if __name__ == "__main__":
    main()
