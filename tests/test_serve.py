"""`siglip-dola serve`: the JSON API through Starlette's TestClient (same rows as the search API, traversal,
bad input, concurrency, an index that changes or breaks) and the page in headless Chromium."""
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from starlette.testclient import TestClient  # starlette is a runtime dependency: no skip

from siglip_dola.data import shapes
from siglip_dola.modes import MODES
from siglip_dola.retrieval import RerankConfig, add_to_index, build_index, open_index, search, search_captions
from siglip_dola.viewer.app import bind, create_app, url_of
from siglip_dola.viewer.service import SearchService
from browser import Chromium

CAPTIONS = ["a red circle", "a blue square", "a green star", "a small yellow triangle", "a purple cross"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    for i in range(12):
        shapes.make_sample("test", i).image.save(folder / f"shape_{i:02d}.png")
    (folder / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return folder


@pytest.fixture(scope="module")
def index_dir(gallery, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("served") / "idx"
    build_index(sorted(gallery.glob("shape_0[0-9].png")), out, model, layers=[2, 4], progress=False)
    return out


@pytest.fixture(scope="module")
def client(index_dir, gallery, model):
    service = SearchService(index_dir, model, captions=gallery / "captions.txt")
    with TestClient(create_app(service)) as test_client:
        yield test_client


def _tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_mtime_ns}:{stat.st_mode}:".encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("mode", ["off", "static", "dynamic"])
def test_api_rows_equal_the_search_api(client, index_dir, model, mode):
    answer = client.get("/api/search", params={"q": "a red circle", "k": 4, "rerank_k": 8, "mode": mode}).json()
    expected = search(open_index(index_dir), "a red circle", model, RerankConfig(top_k=4, rerank_k=8, mode=mode))
    assert {k: answer[k] for k in ("query", "query_type", "item_type", "premature_layer", "jsd", "hits")} == json.loads(json.dumps(expected.to_json()))
    paths = open_index(index_dir).paths
    assert [paths[i] for i in answer["ids"]] == [hit["item"] for hit in answer["hits"]]
    assert answer["settings"]["mode"] == mode and answer["settings"]["top_k"] == 4
    assert answer["settings"]["sources"]["mode"] == "request" and answer["latency_ms"] >= 0  # the request set it
    assert answer["settings"]["sources"]["top_k"] == "request"


def test_images_only_by_index_id(client, gallery, index_dir):
    first = client.get("/image/0")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    shown = Image.open(io.BytesIO(first.content))
    original = Image.open(open_index(index_dir).paths[0])
    assert shown.format == "JPEG" and shown.size == original.size  # 64 px shapes: re-encoded, not resized
    for url in ["/image/10", "/image/-1", "/image/1.0", "/image/0x1", "/image/..%2f..%2fetc%2fpasswd",
                "/image/%2e%2e/%2e%2e/etc/passwd", "/image/../../etc/passwd", "/..%2f..%2fetc/passwd",
                "/" + str(gallery / "shape_00.png"), "//etc/passwd", "/image/" + str(gallery / "shape_00.png"),
                "/static/search.html", "/api/../image/0x", "/manifest.json", "/segments"]:
        response = client.get(url)
        assert response.status_code == 404, url
        assert b"root:" not in response.content and not response.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("params, needle", [
    ({"q": ""}, "must not be empty"), ({"q": "   "}, "must not be empty"), ({}, "must not be empty"),
    ({"q": "x" * 1001}, "at most 1000"), ({"q": "a", "k": 0}, "k must be an integer in [1, 100]"),
    ({"q": "a", "k": 101}, "k must be an integer in [1, 100]"), ({"q": "a", "k": "ten"}, "k must be an integer"),
    ({"q": "a", "k": 5, "rerank_k": 4}, "rerank_k must be an integer in [5, 1000]"),
    ({"q": "a", "rerank_k": 1001}, "rerank_k must be an integer in [10, 1000]"),
    ({"q": "a", "mode": "contrast"}, f"mode must be one of {list(MODES)}")])
def test_bad_input_is_a_400_naming_the_parameter(client, params, needle):
    response = client.get("/api/search", params=params)
    assert response.status_code == 400 and needle in response.json()["error"]


def test_upload_not_an_image_is_a_400_and_the_server_stays_up(client, gallery, model):
    for body in (b"", b"hello", b"\x89PNG\r\n\x1a\n truncated", b"GIF89a" + bytes(100)):
        response = client.post("/api/search-image", content=body)
        assert response.status_code == 400 and "not an image" in response.json()["error"]
    assert client.post("/api/search-image", content=bytes(11 * 1024 * 1024)).status_code == 413
    data = (gallery / "shape_03.png").read_bytes()
    answer = client.post("/api/search-image", params={"k": 3, "rerank_k": 5}, content=data).json()
    expected = search_captions(model, Image.open(io.BytesIO(data)), CAPTIONS,
                               RerankConfig(top_k=3, rerank_k=5, layers=[2, 4]))
    assert answer["hits"] == json.loads(json.dumps(expected.to_json()))["hits"]
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200


def test_concurrent_queries_equal_serial_answers(client):
    queries = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "star")]
    serial = {q: client.get("/api/search", params={"q": q, "k": 5}).json()["hits"] for q in queries}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: (q, client.get("/api/search", params={"q": q, "k": 5})), queries * 3))
    for q, response in answers:
        assert response.status_code == 200 and response.json()["hits"] == serial[q]


def test_served_index_is_not_modified(index_dir, gallery, model):
    before = _tree_digest(index_dir)
    with TestClient(create_app(SearchService(index_dir, model))) as c:
        for q in ("a red circle", "a blue star"):
            assert c.get("/api/search", params={"q": q}).status_code == 200
        assert c.get("/image/1").status_code == 200
    assert _tree_digest(index_dir) == before


def test_index_that_changes_or_breaks_while_serving(gallery, model, tmp_path):
    root = tmp_path / "idx"
    build_index(sorted(gallery.glob("shape_0[0-5].png")), root, model, layers=[2, 4], progress=False)
    with TestClient(create_app(SearchService(root, model))) as c:
        assert c.get("/api/info").json()["count"] == 6
        add_to_index(root, sorted(gallery.glob("shape_*.png")), model, progress=False)  # a new commit
        assert c.get("/api/info").json()["count"] == 12
        answer = c.get("/api/search", params={"q": "a red circle", "k": 12, "rerank_k": 12}).json()
        assert sorted(answer["ids"]) == list(range(12))
        manifest = (root / "manifest.json").read_text()
        (root / "manifest.json").write_text("{ broken")
        for response in (c.get("/api/search", params={"q": "a red circle"}), c.get("/api/info"), c.get("/image/0")):
            assert response.status_code == 503 and "changed on disk" in response.json()["error"]
        (root / "manifest.json").write_text(manifest)
        assert c.get("/api/search", params={"q": "a red circle"}).status_code == 200


@pytest.fixture
def live_server(index_dir, gallery, model):
    """uvicorn on a free loopback port in a thread; stopped after the test."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    service = SearchService(index_dir, model, captions=gallery / "captions.txt")
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_page_in_chromium_renders_both_rankings(live_server, gallery):
    with Chromium() as browser:
        browser.open(live_server + "?q=a+red+circle&k=5&mode=dynamic")
        assert browser.evaluate("document.querySelectorAll('#col-off .hit').length") == 5
        assert browser.evaluate("document.querySelectorAll('#col-dola .hit').length") == 5
        assert "premature layer" in browser.evaluate("document.querySelector('#col-dola h2').textContent")
        assert browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        status = browser.evaluate("document.getElementById('status').textContent")
        assert "latency" in status and "alpha=0.1" in status
        # a changed k on the page, submitted with the button, re-renders with the new size
        browser.evaluate("document.body.dataset.ready = ''; document.getElementById('k').value = 3; "
                         "document.getElementById('go').click()")
        browser.wait_for("document.body.dataset.ready === '1'")
        assert browser.evaluate("document.querySelectorAll('#col-dola .hit').length") == 3
        # an image upload searches the captions: both columns list captions
        document = browser.send("DOM.getDocument")["root"]["nodeId"]
        upload = browser.send("DOM.querySelector", nodeId=document, selector="#upload")["nodeId"]
        browser.evaluate("document.body.dataset.ready = ''")
        browser.send("DOM.setFileInputFiles", nodeId=upload, files=[str(gallery / "shape_00.png")])
        browser.wait_for("document.body.dataset.ready === '1'")
        captions = browser.evaluate("Array.from(document.querySelectorAll('#col-dola .captions li')).length")
        assert captions == 3 and browser.evaluate("document.querySelectorAll('#col-off .captions li').length") == 3
        assert browser.errors() == []
        assert all(u.startswith((live_server, "data:")) for u in browser.requested_urls())


def test_cli_serve_prints_its_loopback_url_and_serves(index_dir, tiny_dir):
    process = subprocess.Popen([sys.executable, "-m", "siglip_dola", "serve", str(index_dir), "--port", "0",
                                "--model", str(tiny_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("siglip-dola serve: http://127.0.0.1:"), (line, process.stderr.read() if
                                                                          process.poll() is not None else "")
        url = line.split()[2]
        info = json.load(urllib.request.urlopen(url + "api/info", timeout=30))
        assert info["count"] == 10 and info["layers"] == [2, 4]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_cli_serve_bad_port_is_a_clear_error(index_dir, tiny_dir, capsys):
    from siglip_dola.cli import main

    with pytest.raises(SystemExit):
        main(["serve", str(index_dir), "--port", "-1"])
    assert "must be in 0..65535" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # past the range: no bind(), no OverflowError traceback
        main(["serve", str(index_dir), "--port", "99999"])
    err = capsys.readouterr().err
    assert "--port: must be in 0..65535, got 99999" in err and "Traceback" not in err


def _calibration(model_id, static_layer=4, dynamic_layers=(2, 4)):
    """A calibration report as `calibrate` writes it: the choice (static here) and the best point per mode."""
    point = {"bucket": None, "n_buckets": None, "contrast_weight": 0.5}
    static = {"mode": "static", "layers": [static_layer], "static_layer": static_layer, "alpha": 0.2, **point}
    dynamic = {"mode": "dynamic", "layers": list(dynamic_layers), "static_layer": None, "alpha": 0.05, **point}
    return {"model": model_id, "dataset": "shapes", "split": "val", "choice": static,
            "best": {"static": static, "dynamic": dynamic}}


def test_calibration_fills_settings_flags_win_and_sources_say_so(index_dir, model):
    service = SearchService(index_dir, model, RerankConfig(alpha=0.3), flags={"alpha"},
                            calibration=_calibration(model.model_id, 4), calibration_name="calib.json")
    with TestClient(create_app(service)) as c:
        answer = c.get("/api/search", params={"q": "a blue star", "k": 4, "mode": "static"}).json()
        expected = search(open_index(index_dir), "a blue star", model,
                          RerankConfig(top_k=4, mode="static", static_layer=4, alpha=0.3, contrast_weight=0.5))
        assert answer["hits"] == json.loads(json.dumps(expected.to_json()))["hits"]
        assert answer["premature_layer"] == 4
        settings = answer["settings"]
        assert (settings["static_layer"], settings["alpha"], settings["layers"]) == (4, 0.3, [4])
        assert settings["sources"]["static_layer"] == "calibration" and settings["sources"]["alpha"] == "flag"
        assert (settings["contrast_weight"], settings["sources"]["contrast_weight"]) == (0.5, "calibration")
        assert settings["calibration"] == "calib.json"
        dynamic = c.get("/api/search", params={"q": "a blue star", "mode": "dynamic"}).json()["settings"]
        assert dynamic["layers"] == [2, 4] and dynamic["sources"]["layers"] == "calibration"


def test_without_flags_or_calibration_the_index_settings_serve_and_say_where_they_came_from(tmp_path, model):
    """An index built from a calibration serves its settings, sources included (the page once said 'default')."""
    for i in range(12):
        shapes.make_sample("test", i).image.save(tmp_path / f"s_{i:02d}.png")
    stored = {"mode": "dynamic", "layers": [2, 4], "alpha": 0.2, "contrast_weight": 0.5, "static_layer": None,
              "bucket": None, "n_buckets": None}
    calibration = {"model": model.model_id, "dataset": "shapes", "split": "val", "choice": stored,
                   "best": {"dynamic": stored}}
    build_index(sorted(tmp_path.glob("*.png")), tmp_path / "idx", model, progress=False, calibration=calibration)
    with TestClient(create_app(SearchService(tmp_path / "idx", model))) as c:
        settings = c.get("/api/search", params={"q": "a red circle", "k": 3}).json()["settings"]
    assert (settings["mode"], settings["layers"], settings["alpha"], settings["contrast_weight"]) == (
        "dynamic", [2, 4], 0.2, 0.5)
    assert settings["sources"]["layers"] == settings["sources"]["alpha"] == "calibration"


def test_a_mode_the_index_cannot_serve_is_a_clear_error_and_the_others_still_work(index_dir, model):
    """A calibration whose static layer (3) the index does not store: the page starts, a static request is a 400
    naming the mode, the layers the index stores and the ones needed; dynamic is served with its calibrated layers."""
    service = SearchService(index_dir, model, calibration=_calibration(model.model_id, 3))
    with TestClient(create_app(service)) as c:
        info = c.get("/api/info").json()
        assert "static" in info["unavailable"] and "dynamic" not in info["unavailable"]
        assert info["baseline"] == "off" and info["modes"] == list(MODES)
        static = c.get("/api/search", params={"q": "a red circle", "mode": "static"})
        assert static.status_code == 400
        assert static.json()["error"].startswith("static mode: index ")
        assert "stores layers [2, 4], but the settings need layers [3]" in static.json()["error"]
        dynamic = c.get("/api/search", params={"q": "a red circle", "mode": "dynamic"})
        assert dynamic.status_code == 200 and dynamic.json()["settings"]["layers"] == [2, 4]
        assert c.get("/api/search", params={"q": "a red circle", "mode": "off"}).status_code == 200


def test_a_served_default_mode_that_cannot_run_or_another_models_calibration_is_refused(index_dir, model):
    with pytest.raises(ValueError, match=r"static mode: index .* stores layers \[2, 4\], but the settings need layers \[3\]"):
        SearchService(index_dir, model, RerankConfig(mode="static"), calibration=_calibration(model.model_id, 3))
    with pytest.raises(ValueError, match="calibration .*was made for model 'other'"):
        SearchService(index_dir, model, calibration=_calibration("other"))


def test_serve_calibration_embedded_is_the_retrieval_one(tmp_path):
    """`serve --calibration embedded` means the embedded model's shipped RETRIEVAL calibration (it once read the
    classification one): its choice, read here from the shipped file, is what a query runs with."""
    from siglip_dola.layers import resolve_layers
    from siglip_dola.loading import embedded, load

    for i in range(12):
        shapes.make_sample("test", i).image.save(tmp_path / f"s_{i:02d}.png")
    model = load(None)
    build_index(sorted(tmp_path.glob("*.png")), tmp_path / "idx", model, progress=False, layers=list(range(1, 24)))
    choice = json.loads(embedded.EMBEDDED_RETRIEVAL_CALIBRATION.read_text())["choice"]
    service = SearchService(tmp_path / "idx", model, calibration="embedded", calibration_name="embedded")
    with TestClient(create_app(service)) as c:
        settings = c.get("/api/search", params={"q": "a red circle", "k": 3, "mode": "dynamic"}).json()["settings"]
    assert settings["layers"] == resolve_layers(24, bucket=choice["bucket"], n_buckets=choice["n_buckets"])
    assert (settings["alpha"], settings["contrast_weight"]) == (choice["alpha"], choice["contrast_weight"])
    assert settings["sources"]["alpha"] == "calibration" and settings["calibration"] == "embedded"
