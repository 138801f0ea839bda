"""Viewer measurements: the report's size and open/filter time at 10k rows in headless Chromium,
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
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def embedded(out: Path, limit: int | None) -> tuple[Path, Path]:
    """Result JSON + Predictions JSONL of the embedded model on shapes test: the `eval` command's own evaluate()."""
    from siglip_dola.evaluation.evaluate import evaluate
    from siglip_dola.loading import load

    out.mkdir(parents=True, exist_ok=True)
    result, rows = out / "result.json", out / "predictions.jsonl"
    evaluate(load(None), "shapes", split="test", out=result, predictions=rows, n=limit, progress=False)
    return result, rows


@contextlib.contextmanager
def served_shapes_index(folder: Path, n_images: int):
    """The search page over an index of `n_images` shapes test images in `folder`, served by uvicorn on a free
    loopback port; yields its URL and stops the server on exit."""
    import uvicorn

    from siglip_dola.data import shapes
    from siglip_dola.loading import load
    from siglip_dola.retrieval import build_index
    from siglip_dola.viewer.app import bind, create_app, url_of
    from siglip_dola.viewer.service import SearchService

    for i in range(n_images):
        shapes.make_sample("test", i).image.save(folder / f"s_{i:03d}.png")
    model = load(None)
    build_index(sorted(folder.glob("*.png")), folder / "idx", model, progress=False)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(SearchService(folder / "idx", model)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
    words = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star")]
    with tempfile.TemporaryDirectory() as tmp, served_shapes_index(Path(tmp), 200) as url:
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
        return rows


def screenshots(docs: Path, limit: int) -> None:
    """docs/report.png (embedded model on shapes test) and docs/search.png (a served shapes index)."""
    from browser import Chromium
    from siglip_dola.viewer import write_report

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result, predictions = embedded(tmp / "eval", limit)
        out = write_report(result, predictions, tmp / "report.html")
        with Chromium(width=1280, height=1500) as browser:
            browser.open(out.as_uri() + "#mode=dynamic&outcome=fixed")
            browser.screenshot(docs / "report.png", full_page=False)
        with served_shapes_index(tmp, 120) as url, Chromium(width=1280, height=860) as browser:
            browser.open(url + "?q=a+red+circle&k=8&rerank_k=100&mode=dynamic")
            browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            browser.screenshot(docs / "search.png", full_page=True)


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
