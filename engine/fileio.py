"""Writing a file so that readers see the old one or the new one, never half of it.

Every file the project writes for keeps (results, their parts, prepared ONNX graphs,
engines, manifests, timing caches) goes through :func:`replacing`: the bytes are
written under a temporary name of the writer's own beside the destination, synced,
renamed over it, and the folder synced (where the file system allows). Two writers of
one file each rename a whole file of their own; a writer that fails or is interrupted
leaves the old file and no temporary one. The new file gets the mode the umask allows
(0644 under umask 022), as a plain ``open()`` would, not the 0600 of a private
temporary file.

An ONNX graph past protobuf's 2 GiB limit and the ``.data`` file beside it that it names
(:func:`builders.onnx_io.write_model_atomic`) are each renamed whole into place, the
weights first; the pair is not replaced as one.
"""

from __future__ import annotations

import glob
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread safe, but brief)
    os.umask(mask)
    return mask


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}."


def leftover_temps(dest: Path | str) -> list[Path]:
    """Temporary files :func:`replacing` left beside ``dest`` when its writer was killed
    (an interrupted writer removes its own): for a caller that knows no writer of
    ``dest`` is running to remove."""
    dest = Path(dest)
    return sorted(dest.parent.glob(glob.escape(_temp_prefix(dest)) + "*.tmp"))


@contextmanager
def replacing(dest: Path | str) -> Iterator[str]:
    """Yield a temporary path beside ``dest`` to write the new file at; when the block
    ends without an exception, the file is synced and renamed onto ``dest``, otherwise
    removed. ``dest``'s folder must exist."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(dest.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """``data`` as the whole of ``path`` (its folder made if missing), via :func:`replacing`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def user_path(text: str) -> Path:
    """A path as a user typed it, ``~`` expanded: the argparse ``type`` of every path
    option, since the shell leaves ``--out=~/x`` as it is (it expands only a word that
    starts with ``~``)."""
    return Path(text).expanduser()
