"""Fetching a published ONNX file from the model hub (online machines only).

``huggingface_hub`` is an optional extra and imported lazily. ``HF_HUB_OFFLINE`` is
read at call time (the library itself reads it once, at import), and in offline mode
only a copy already in the hub's local cache is used.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from engine.errors import DependencyError, ModelError
from engine.specs import ModelSpec

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def alternatives_hint(spec: ModelSpec) -> str:
    task = spec.task.value
    return f"pass --{task}-onnx FILE, --{task}-checkpoint FILE, or --random-weights for a smoke run"


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves (fails fast on a machine without network)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def download_published(spec: ModelSpec, dest_dir: Path) -> Path:
    """Download ``spec``'s published file into ``dest_dir`` and return its path
    (``dest_dir / spec.hub.filename``). Any failure is a one-line :class:`ModelError`."""
    if spec.hub is None:
        raise ModelError(f"{spec.key} has no published file on the hub: {alternatives_hint(spec)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DependencyError("huggingface_hub", "hub", "Downloading the published models") from None

    repo, filename = spec.hub.repo, spec.hub.filename
    offline = hub_offline()
    dest_dir = Path(dest_dir)
    started = time.perf_counter()
    logger.info("downloading %s/%s%s ...", repo, filename, " (offline: local hub cache only)" if offline else "")
    if not offline and not _hub_resolves():
        # No name resolution for the hub: fail now instead of after the client's retries.
        offline = True
        why = "offline: the hub's address does not resolve"
    else:
        why = "HF_HUB_OFFLINE is set" if offline else "offline?"
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would break the one-line error
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        local = hf_hub_download(repo_id=repo, filename=filename, local_dir=dest_dir, local_files_only=offline)
    except (OSError, ValueError) as exc:  # the hub's errors (HTTP, offline, not found) are OSErrors
        logger.debug("download of %s/%s failed: %r", repo, filename, exc)
        raise ModelError(f"could not download {repo}/{filename} ({why}): {alternatives_hint(spec)}") from None
    finally:
        hub_log.setLevel(level)
    path = Path(local)
    logger.info("downloaded %s/%s to %s in %.1f s", repo, filename, path, time.perf_counter() - started)
    return path
