"""The local search page: a Starlette app over a SearchService, and `run` to serve it with uvicorn.

Routes (everything else, traversal attempts included, is a 404: no route reads a path from the request):
    GET  /                       the page (inline script and style; it fetches only the routes below)
    GET  /api/info               index size, layers, model, defaults and limits
    GET  /api/search?q=&k=&rerank_k=&mode=     search --json's answer + ids, settings, latency_ms
    POST /api/search-image?k=&rerank_k=&mode=  body: an image; caption search (server started with --captions)
    GET  /image/{id}             a JPEG thumbnail of index image `id` (an integer index id, nothing else)
"""
from __future__ import annotations

import socket
from importlib import resources

from siglip_dola.dependencies import require
from siglip_dola.viewer.service import IndexUnavailable, SearchService

# the [serve] extra, checked when `siglip-dola serve` starts (before its model loads), not after
require("starlette", "serve", "the search page")
uvicorn = require("uvicorn", "serve", "the search page")

PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self' data:; connect-src 'self'; "
                "style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def create_app(service: SearchService):
    """The Starlette app serving `service`; sync handlers run in the threadpool, the service serialises."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    page = resources.files("siglip_dola.viewer").joinpath("static", "search.html").read_text(encoding="utf-8")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"X-Content-Type-Options": "nosniff"})

    def answer(call):
        try:
            return JSONResponse(call(), headers={"Cache-Control": "no-store"})
        except IndexUnavailable as err:
            return error(503, str(err))
        except (ValueError, TypeError) as err:
            return error(400, str(err))

    def home(request):
        return HTMLResponse(page, headers=PAGE_HEADERS)

    def info(request):
        return answer(service.info)

    def api_search(request):
        params = request.query_params
        return answer(lambda: service.search_text(params.get("q", ""), service.parse(
            params.get("k"), params.get("rerank_k"), params.get("mode"))))

    async def api_search_image(request):
        params = request.query_params
        limit, body = service.limits.max_upload_bytes, bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                return error(413, f"the upload is over {limit} bytes")
        return await run_in_threadpool(answer, lambda: service.search_image(bytes(body), service.parse(
            params.get("k"), params.get("rerank_k"), params.get("mode"))))

    def image(request):
        try:
            data = service.thumbnail(request.path_params["image_id"])
        except IndexUnavailable as err:
            return error(503, str(err))
        if data is None:
            return error(404, "no such image in this index")
        return Response(data, media_type="image/jpeg", headers={"X-Content-Type-Options": "nosniff",
                                                                "Cache-Control": "max-age=3600"})

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        return error(status, "not found" if status == 404 else str(getattr(exc, "detail", "error")))

    routes = [Route("/", home), Route("/api/info", info), Route("/api/search", api_search),
              Route("/api/search-image", api_search_image, methods=["POST"]),
              Route("/image/{image_id:int}", image)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket (port 0: any free port), so the printed URL is the one actually served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"host={host} port={port}: cannot listen there ({err.strerror}); "
                         "pick another port (0 = any free port)") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(app, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until interrupted (uvicorn, no access log)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
