"""The Hugging Face hub, or its local cache, for the built-ins that load from it (gpt2, ultrachat).

Every loader accepts a hub name or a local directory. Without network the hub libraries retry for
half a minute before failing, so `hub_reachable` probes the endpoint first and, when it is
unreachable, only the local hub cache is consulted; a miss fails at once with one line that says
which key to set instead.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from newllm_kit.errors import DataError

PROBE_SECONDS = 2.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """False under HF_HUB_OFFLINE, or when the hub endpoint (or the HTTPS proxy) refuses a TCP
    connection within `timeout` seconds; the probe runs in a daemon thread so a hanging DNS
    lookup cannot stall the caller."""
    from huggingface_hub import constants

    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE:
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if host is None:
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Offline mode for hub libraries that are already imported: they read HF_HUB_OFFLINE once,
    at import, into module constants, so those constants are switched for the duration."""
    from huggingface_hub import constants

    modules: list[Any] = [constants]
    if "datasets.config" in sys.modules:  # importing it just to patch it would cost seconds
        modules.append(sys.modules["datasets.config"])
    saved = [module.HF_HUB_OFFLINE for module in modules]
    try:
        for module in modules:
            module.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module.HF_HUB_OFFLINE = value


def local_dir(name_or_path: str, key: str) -> Path | None:
    """The directory `name_or_path` names, None for a hub repo id, DataError for a missing path."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"{key}: {path} is a file; point it at the directory that holds the GPT-2 files")
    # a hub id is "name" or "owner/name"; anything else was meant as a path
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise DataError(f"{key}: directory {path} does not exist; point it at a local GPT-2 directory")
    return None


def local_or_hub(name_or_path: str, revision: str | None, section: str) -> Path | None:
    """`local_dir` of `{section}.name_or_path`; a revision names a hub commit, so it cannot go with a directory."""
    directory = local_dir(name_or_path, f"{section}.name_or_path")
    if directory is not None and revision is not None:
        raise DataError(f"{section}.revision = {revision!r} applies to a hub repo id, but {section}.name_or_path is "
                        f"the local directory {directory}; remove {section}.revision")
    return directory
