"""Hugging Face Hub access that never hangs: cache first, then a short reachability probe, then download.

huggingface_hub retries a dead connection for ~20 s (5 retries with back-off) before giving up, and
open_clip / transformers call it several times per load. We therefore look in the local cache first
(`local_files_only=True`, no network at all), and only when something is missing do we spend at most
`PROBE_TIMEOUT_S` checking that the Hub endpoint answers before asking huggingface_hub to download.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(OSError):
    """The requested Hub files are not in the local cache and the Hub cannot be reached."""


def offline_help(repo_id: str) -> str:
    """The message telling the user how to load `repo_id` without network."""
    return (
        f"cannot load '{repo_id}': its files are not in the local Hugging Face cache and the Hub is not "
        "reachable (or HF_HUB_OFFLINE=1). Point at local weights instead: a local directory "
        "(HF save_pretrained layout: config.json + model.safetensors, or an open_clip folder with "
        "open_clip_config.json), an open_clip checkpoint as 'MODEL-NAME:/path/to/weights.safetensors', "
        "or download it once on a connected machine and copy the cache, then set HF_HOME to that cache. "
        "With no argument, siglip_dola.load() uses the embedded offline model."
    )


def _hub_offline_flag() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _endpoint_host() -> tuple[str, int]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    return parsed.hostname or "huggingface.co", port


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hub endpoint opens within `timeout_s` (DNS included)."""
    host, port = _endpoint_host()
    outcome: list[bool] = []

    def probe() -> None:  # getaddrinfo has no timeout of its own, so run it in a daemon thread
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(outcome and outcome[0])


def snapshot(repo_id: str, patterns: list[str], weight_files: list[str]) -> Path:
    """Local folder holding `repo_id`'s files matching `patterns` plus the first available of `weight_files`.

    `weight_files` are alternatives in order of preference (only one is downloaded). The local cache is
    searched first without any network; when nothing is cached, raises HubUnavailableError quickly if
    the Hub cannot be reached.
    """
    from huggingface_hub import snapshot_download

    for weight_file in weight_files:
        cached = _cached_snapshot(repo_id, [*patterns, weight_file], weight_file)
        if cached is not None:
            return cached
    if _hub_offline_flag() or not hub_reachable():
        raise HubUnavailableError(offline_help(repo_id))
    for weight_file in weight_files:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*patterns, weight_file]))
        if (folder / weight_file).is_file():
            return folder
    raise FileNotFoundError(f"Hub repo '{repo_id}' has none of the expected files {weight_files}")


def _cached_snapshot(repo_id: str, patterns: list[str], weight_file: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, bad repo id, ...: treat as not cached
        return None
    return folder if (folder / weight_file).is_file() else None
