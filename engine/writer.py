"""Parquet output: written in parts as the run goes, merged atomically at the end.

Layout while a run is in progress, for ``--out results.parquet``::

    results.parquet.lock            owner's pid; a second run on the same output refuses
    results.parquet.parts/
        part-000001.parquet         each part written to a temp name, then renamed
        part-000002.parquet

Every part is complete or absent, so a run killed at any point loses at most the rows
still in memory. A rerun reads the paths already present (parts and any previous final
file) and skips them; at the end everything is merged into ``results.parquet`` (temp
file, fsync, rename) and the parts folder is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import polars as pl

from engine.errors import OutputError

log = logging.getLogger(__name__)

CONFIG_KEY = "engine.config"


class OutputLock:
    """An exclusive lock file holding the owner's pid; a lock whose process is gone is
    stale and taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _pid_alive(owner):
                    raise OutputError(
                        f"another run (pid {owner}) is writing {self.path.with_suffix('')}; "
                        f"wait for it or choose another --out"
                    ) from None
                log.warning("removing stale lock %s (pid %s is gone)", self.path, owner)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._held = True
            return
        raise OutputError(f"cannot take the lock {self.path}")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(df: pl.DataFrame, dest: Path, metadata: Mapping[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        df.write_parquet(tmp, metadata=dict(metadata))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultWriter:
    """Collects result rows and writes them as described in the module docstring.

    ``config`` describes what produced the rows (models, weights, precision); resuming
    into an output made with another config is refused, so one file never mixes the
    results of different models.
    """

    def __init__(
        self,
        out: Path,
        schema: Mapping[str, pl.DataType],
        config: Mapping[str, object],
        *,
        overwrite: bool = False,
        part_rows: int = 512,
    ) -> None:
        self.out = Path(out)
        self.schema = pl.Schema(schema)
        self.config_json = json.dumps(config, sort_keys=True)
        self.overwrite = overwrite
        self.part_rows = part_rows
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self._lock = OutputLock(self.out.with_name(self.out.name + ".lock"))
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        self._next_part = 1
        self.rows_written = 0
        self.done: set[str] = set()
        self.resumed_rows = 0

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> "ResultWriter":
        parent = self.out.parent
        if not parent.is_dir():
            raise OutputError(f"output folder does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"output folder is not writable: {parent}")
        if self.out.is_dir():
            raise OutputError(f"output path is a folder: {self.out}")
        self._lock.acquire()
        try:
            if self.overwrite:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                self.out.unlink(missing_ok=True)
            self.parts_dir.mkdir(exist_ok=True)
            # Temp files of a killed run (we hold the lock, so none is being written).
            for stale in [*self.out.parent.glob(f".{self.out.name}.*.tmp"), *self.parts_dir.glob(".part-*.tmp")]:
                stale.unlink(missing_ok=True)
            self._load_previous()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __enter__(self) -> "ResultWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
            else:
                # Keep what is finished: the rows in memory become one more part.
                self.flush()
        finally:
            self._lock.release()

    # -- resume ------------------------------------------------------------------------
    def _existing_files(self) -> list[Path]:
        files = sorted(self.parts_dir.glob("part-*.parquet"))
        if self.out.is_file():
            files.insert(0, self.out)
        return files

    def _load_previous(self) -> None:
        for f in self._existing_files():
            try:
                meta = pl.read_parquet_metadata(f)
                paths = pl.read_parquet(f, columns=["path"])["path"]
            except Exception as exc:  # a foreign or damaged file: never overwrite silently
                raise OutputError(f"{f} is not a readable result file ({exc}); use --overwrite to start fresh") from None
            if meta.get(CONFIG_KEY) != self.config_json:
                raise OutputError(
                    f"{f} holds results of another configuration (models, weights or precision differ); "
                    f"use --overwrite to start fresh or choose another --out"
                )
            self.done.update(paths.to_list())
            if f.parent == self.parts_dir:
                self._next_part = max(self._next_part, int(f.stem.split("-")[1]) + 1)
        self.resumed_rows = len(self.done)
        if self.resumed_rows:
            log.info("resuming: %d images already in %s", self.resumed_rows, self.out)

    # -- writing -----------------------------------------------------------------------
    def add(self, rows: pl.DataFrame) -> None:
        if rows.schema != self.schema:
            raise ValueError(f"rows schema {rows.schema} != writer schema {self.schema}")
        if rows.height == 0:
            return
        self._buffer.append(rows)
        self._buffered += rows.height
        if self._buffered >= self.part_rows:
            self.flush()

    def add_rows(self, rows: Iterable[Mapping[str, object]]) -> None:
        self.add(pl.DataFrame(list(rows), schema=self.schema, orient="row"))

    def flush(self) -> None:
        if not self._buffer:
            return
        df = pl.concat(self._buffer)
        part = self.parts_dir / f"part-{self._next_part:06d}.parquet"
        _atomic_write(df, part, {CONFIG_KEY: self.config_json})
        self._next_part += 1
        self.rows_written += df.height
        self._buffer.clear()
        self._buffered = 0

    def finish(self) -> None:
        """Merge the previous output and all parts into the final file, atomically."""
        self.flush()
        files = self._existing_files()
        if files:
            merged = (
                pl.concat([pl.read_parquet(f) for f in files])
                .unique(subset="path", keep="last", maintain_order=True)
            )
        else:
            merged = pl.DataFrame(schema=self.schema)
        _atomic_write(merged, self.out, {CONFIG_KEY: self.config_json})
        shutil.rmtree(self.parts_dir, ignore_errors=True)
