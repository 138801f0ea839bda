"""What the search page serves, without the web framework: bounded queries over one opened index.

The index is opened read-only (memory-mapped vectors, FAISS read into memory) and re-opened when its
manifest changes on disk (`index add` commits a new one); an index that cannot be (re)opened or read
answers IndexUnavailable with the reason, never a crash. The model forward and the rerank run under
one lock: the readout's hooks belong to one call at a time (see the README).
"""
from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from siglip_dola.modes import BASELINE, MODES, mode_of
from siglip_dola.retrieval import RerankConfig, open_index, search, search_captions
from siglip_dola.retrieval.captions import encode_captions, read_captions
from siglip_dola.retrieval.index import index_settings
from siglip_dola.settings import DEFAULTS, DoLaSettings

THUMB_SIZE = 256


class IndexUnavailable(RuntimeError):
    """The index changed or broke on disk while serving; the message says what and what to do."""


@dataclass
class Limits:
    """Bounds on request inputs (each violation is a 400 naming the parameter and its range)."""
    max_k: int = 100
    max_rerank_k: int = 1000
    max_query_chars: int = 1000
    max_upload_bytes: int = 10 * 1024 * 1024


@dataclass
class Query:
    """One validated request: k results after reranking rerank_k first-stage candidates with `mode`."""
    k: int
    rerank_k: int
    mode: str
    given: frozenset = frozenset()  # the parameters this request set ("k", "rerank_k", "mode")


def _bounded_int(name: str, text, low: int, high: int, default: int) -> int:
    if text is None or text == "":
        value = default
    else:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value}")
    return value


def mode_settings(index, base: RerankConfig, flags: set[str], calibration=None) -> dict[str, DoLaSettings | str]:
    """Every mode of the table -> DoLaSettings for `index`, by siglip_dola.settings' one policy: the command-line
    flags named in `flags` > `calibration` (path, "embedded" or report dict) > the index's stored settings >
    defaults, each value's source recorded; or, for a mode that cannot run on this index (e.g. a static layer it
    does not store), the reason, naming the mode: the other modes are still served."""
    given = {name: getattr(base, name) for name in ("layers", "static_layer", "alpha", "contrast_weight")
             if name in flags}
    settings = {}
    for mode, entry in MODES.items():
        mode_flags = {k: v for k, v in given.items() if entry.fixed_layer or k != "static_layer"}
        try:
            settings[mode] = index_settings(index.manifest, calibration, root=index.root, warn=False, mode=mode,
                                            **mode_flags)
        except ValueError as err:
            settings[mode] = f"{mode} mode: {err}"
    return settings


class SearchService:
    """Queries over the index at `root` with `model` (LoadedModel); `base` holds the served defaults,
    `flags` the RerankConfig fields given on the command line, `calibration` a calibration (path, "embedded"
    or report dict: its choice / best point per mode fills what no flag set; `calibration_name` is recorded),
    else the index's stored settings (see :func:`mode_settings`)."""

    def __init__(self, root, model, base: RerankConfig | None = None, captions=None,
                 image_root=None, limits: Limits | None = None, flags: set[str] | None = None,
                 calibration: dict | None = None, calibration_name: str | None = None):
        self.root, self.model = Path(root), model
        self.base = base or RerankConfig()
        self.limits = limits or Limits()
        self.flags = set(flags or ())
        self.image_root = None if image_root is None else Path(image_root)
        self.lock = threading.Lock()
        self._stamp = None
        self.calibration = calibration
        self.index = self._open()
        self.per_mode = self._mode_settings(self.index)
        self.calibration_name = calibration_name if calibration is not None else \
            self.per_mode[self.default_mode()].calibration
        self.captions = None if captions is None else read_captions(captions)
        self.caption_embeds = None if self.captions is None else encode_captions(model, self.captions)

    # -- the index on disk ---------------------------------------------------------------------------------
    def _manifest_stamp(self):
        stat = os.stat(self.root / "manifest.json")
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _open(self):
        stamp = self._manifest_stamp()
        index = open_index(self.root, model=self.model, layers=self.base.layers)
        self._stamp = stamp
        self.id_of = {path: i for i, path in enumerate(index.paths)}
        return index

    def current(self):
        """The opened index, re-opened first when its manifest changed; IndexUnavailable if that fails."""
        try:
            if self._manifest_stamp() != self._stamp:
                index = self._open()
                self.per_mode = self._mode_settings(index)
                self.index = index
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise IndexUnavailable(f"the index at {str(self.root)!r} changed on disk and cannot be opened: {err}. "
                                   "Fix or rebuild it (siglip-dola index build), then restart siglip-dola serve") from None
        return self.index

    def _mode_settings(self, index) -> dict[str, DoLaSettings | str]:
        """mode_settings for `index`; ValueError when the mode served by default cannot run (nothing to serve)."""
        per_mode = mode_settings(index, self.base, self.flags, self.calibration)
        default = per_mode[self.default_mode(index)]
        if isinstance(default, str):
            raise ValueError(default)
        return per_mode

    # -- requests ------------------------------------------------------------------------------------------
    def default_mode(self, index=None) -> str:
        """The served mode: the --mode flag, else the index's stored settings (siglip_dola.settings), else dynamic."""
        stored = (index or self.index).manifest.settings or {}
        return self.base.mode or stored.get("mode") or DEFAULTS["mode"]

    def parse(self, k=None, rerank_k=None, mode=None) -> Query:
        """Validate request parameters against the limits (ValueError names the parameter)."""
        k_text, rerank_text = k, rerank_k
        k = _bounded_int("k", k, 1, self.limits.max_k, min(self.base.top_k, self.limits.max_k))
        rerank_k = _bounded_int("rerank_k", rerank_k, k, self.limits.max_rerank_k,
                                min(max(self.base.rerank_k, k), self.limits.max_rerank_k))
        given = frozenset(name for name, value in (("k", k_text), ("rerank_k", rerank_text), ("mode", mode))
                          if value not in (None, ""))
        mode = self.default_mode() if mode in (None, "") else mode
        mode_of(mode)
        return Query(k, rerank_k, mode, given)

    def _source(self, query: Query, parameter: str, flag: str) -> str:
        """Where a served value came from: "request", "flag" (the command line), else "default"."""
        return "request" if parameter in query.given else "flag" if flag in self.flags else "default"

    def _config(self, query: Query) -> RerankConfig:
        settings = self.per_mode[query.mode]
        if isinstance(settings, str):   # this mode cannot run on this index: a 400 that says why
            raise ValueError(settings)
        return RerankConfig(top_k=query.k, rerank_k=query.rerank_k, settings=settings)

    def settings(self, query: Query, config: RerankConfig) -> dict:
        """The settings this query ran with and where each came from (flag: command line or request;
        calibration; default)."""
        resolved = config.settings
        recorded = resolved.sources
        layer_source = recorded.get("layers", "default")   # static_layer is part of the layer specification
        mode_source = self._source(query, "mode", "mode")
        if mode_source == "default" and (self.index.manifest.settings or {}).get("mode"):
            mode_source = "index"
        sources = {"mode": mode_source, "top_k": self._source(query, "k", "top_k"),
                   "rerank_k": self._source(query, "rerank_k", "rerank_k"), "layers": layer_source,
                   "static_layer": layer_source, "alpha": recorded.get("alpha", "default"),
                   "contrast_weight": recorded.get("contrast_weight", "default")}
        off = resolved.mode == BASELINE
        return {"mode": resolved.mode, "layers": [] if off else list(resolved.layers),
                "static_layer": resolved.static_layer, "alpha": None if off else resolved.alpha,
                "contrast_weight": None if off else resolved.contrast_weight,
                "top_k": config.top_k, "rerank_k": config.rerank_k, "sources": sources,
                "calibration": self.calibration_name}

    def _answer(self, result, query: Query, config: RerankConfig, started: float, ids) -> dict:
        answer = result.to_json()
        answer["ids"] = ids
        answer.setdefault("settings", self.settings(query, config))
        answer["latency_ms"] = round(1000 * (time.perf_counter() - started), 2)
        return answer

    def search_text(self, text, query: Query) -> dict:
        """search --json's answer for `text`, plus "ids" (index ids of the results), "settings", "latency_ms"."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("q (the query text) must not be empty")
        if len(text) > self.limits.max_query_chars:
            raise ValueError(f"q is {len(text)} characters long; at most {self.limits.max_query_chars} are allowed")
        config = self._config(query)
        with self.lock:
            index = self.current()
            started = time.perf_counter()
            try:
                result = search(index, text, self.model, config)
            except (OSError, KeyError, IndexError) as err:
                raise IndexUnavailable(f"reading the index at {str(self.root)!r} failed: {err}; rebuild it and "
                                       "restart siglip-dola serve") from None
            ids = [self.id_of.get(hit.item) for hit in result.results]
            return self._answer(result, query, config, started, ids)

    def search_image(self, data: bytes, query: Query) -> dict:
        """Caption search for an uploaded image (bytes); ValueError when captions are off or it is no image."""
        if self.captions is None:
            raise ValueError("this server has no captions: start it as `siglip-dola serve INDEX --captions FILE` "
                             "for image queries")
        if len(data) > self.limits.max_upload_bytes:
            raise ValueError(f"the upload is {len(data)} bytes; at most {self.limits.max_upload_bytes} are allowed")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise ValueError("the upload is not an image PIL can decode (PNG, JPEG, WebP, ...)") from None
        config = self._config(query)   # the index's settings: the same layers in both directions
        with self.lock:
            self.current()
            started = time.perf_counter()
            result = search_captions(self.model, image, self.captions, config, caption_embeds=self.caption_embeds)
            return self._answer(result, query, config, started, None)

    def thumbnail(self, image_id: int) -> bytes | None:
        """JPEG thumbnail of index image `image_id`, re-encoded (never the raw file); None when unknown."""
        with self.lock:
            index = self.current()
        if not 0 <= image_id < len(index.paths):
            return None
        path = Path(index.paths[image_id])
        if not path.is_file() and self.image_root is not None:
            path = self.image_root / path.name
        try:
            with Image.open(path) as image:
                image.thumbnail((THUMB_SIZE, THUMB_SIZE))
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=85)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        return buffer.getvalue()

    def info(self) -> dict:
        """What the page needs up front: index size and layers, model, defaults, limits, captions."""
        with self.lock:
            index = self.current()
        return {"index": str(self.root), "count": len(index), "layers": index.layers,
                "model": index.manifest.model_id, "captions": None if self.captions is None else len(self.captions),
                "defaults": {"k": self.base.top_k, "rerank_k": self.base.rerank_k, "mode": self.default_mode(),
                             "alpha": self.base.alpha, "static_layer": self.base.static_layer},
                "limits": {"max_k": self.limits.max_k, "max_rerank_k": self.limits.max_rerank_k,
                           "max_query_chars": self.limits.max_query_chars,
                           "max_upload_bytes": self.limits.max_upload_bytes}, "modes": list(MODES), "baseline": BASELINE,
                "unavailable": {mode: why for mode, why in self.per_mode.items() if isinstance(why, str)}}
