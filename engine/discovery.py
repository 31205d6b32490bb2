"""Streaming, deterministic discovery of image files under a folder.

Paths are yielded as they are found (one directory listing in memory at a time), so a
folder of millions of frames never sits in memory as a list. Order is stable: entries
are sorted per directory, so reruns see the same sequence (which resume relies on).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Iterator

from engine.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def iter_images(root: Path, follow_symlinks: bool = True) -> Iterator[Path]:
    """Image paths under ``root`` (or ``root`` itself if it is a file), as a lazy iterator.

    The input itself is checked at once (an :class:`InputError` is raised here, not on the
    first ``next``), the folder is walked lazily.

    Directory symlinks are followed once: a symlink loop is detected by (device, inode)
    and skipped with a warning. Entries whose name looks like an image are yielded even
    if they turn out to be broken links or unreadable: the reader turns those into error
    rows instead of silently dropping them. Directories that cannot be listed are logged
    and skipped.
    """
    root = Path(root)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise InputError(f"input not found: {root}") from None
    except OSError as exc:
        raise InputError(f"cannot access input {root}: {exc.strerror or exc}") from None
    if stat.S_ISREG(st.st_mode):
        return iter([root])
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"input is neither a folder nor a file: {root}")
    return _walk(root, {(st.st_dev, st.st_ino)}, follow_symlinks)


def _walk(directory: Path, seen: set[tuple[int, int]], follow_symlinks: bool) -> Iterator[Path]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.warning("skipping folder %s: %s", directory, exc.strerror or exc)
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=follow_symlinks)
        except OSError:
            is_dir = False
        if is_dir:
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                log.warning("skipping folder %s: %s", path, exc.strerror or exc)
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                log.warning("skipping %s: symlink loop (folder already visited)", path)
                continue
            yield from _walk(path, seen | {ident}, follow_symlinks)
        elif is_image_name(entry.name):
            yield path
