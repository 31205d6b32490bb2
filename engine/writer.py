"""Parquet output: written in parts as the run goes, merged atomically at the end.

Layout while a run is in progress, for ``--out results.parquet``::

    results.parquet.lock            owner's pid, start time and host; a second run refuses
    results.parquet.parts/
        part-000001.parquet         each part written to a temp name, then renamed
        part-000002.parquet

Every part is complete or absent, so a run killed at any point loses at most the rows
still in memory. A rerun reads the paths already present (parts and any previous final
file) and skips those that were classified (a path whose rows are all errors is tried
again); at the end everything is merged into ``results.parquet`` (temp file, fsync,
rename; the last row of a path wins) and the parts folder is removed. Files get the
mode the umask allows (0644 under umask 022), not the 0600 of a private temp file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Mapping

import polars as pl

from engine.errors import OutputError
from engine.fileio import leftover_temps, replacing

log = logging.getLogger(__name__)

CONFIG_KEY = "engine.config"


class OutputLock:
    """An exclusive lock file naming its owner: pid, the process's start time and the
    host. A lock whose process is gone, or whose pid now belongs to another process (a
    reused pid: a container restarted, a reboot), is stale and taken over. A lock taken
    on another host cannot be checked from here and is respected."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held = False

    def acquire(self) -> None:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise OutputError(f"{self.path} is in the way of the output's lock file: move it away")
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _owner_alive(owner):
                    elsewhere = owner.get("host") not in (None, _HOST)
                    where = f" on {owner['host']}" if elsewhere else ""
                    hint = (
                        f"; if no run is writing it (a machine or container that is gone), delete {self.path}"
                        if elsewhere else ""
                    )
                    raise OutputError(
                        f"another run (pid {owner['pid']}{where}) is writing {self.path.with_suffix('')}; "
                        f"wait for it or choose another --out{hint}"
                    ) from None
                log.warning("removing stale lock %s (its process %s is gone)", self.path, owner and owner["pid"])
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()), "host": _HOST}, f)
            self._held = True
            return
        raise OutputError(f"cannot take the lock {self.path}")

    def _owner(self) -> dict | None:
        """The lock's owner; a bare pid is the format of earlier versions."""
        try:
            text = self.path.read_text().strip()
        except (OSError, ValueError):  # unreadable or not text: not a lock of ours
            return None
        try:
            data = json.loads(text or "0")
        except ValueError:
            return None
        if isinstance(data, int):
            data = {"pid": data}
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or data["pid"] <= 0:
            return None
        return data

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False


_HOST = socket.gethostname()


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "(comm)", i.e. from field 3 (the state) on;
    None where unknown (no /proc, no such process). The comm may hold spaces and
    parentheses, so the fields start after the last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 1:].split()
    except (OSError, ValueError):
        return None
    return fields or None


def _start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat);
    None where unknown."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19])  # fields after "(comm)" start at 3
    except (TypeError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    # A process killed but not yet reaped by its parent (a zombie, 'Z'; 'X' dead) still
    # answers kill(pid, 0) but writes nothing any more. Without /proc: assume alive.
    fields = _stat_fields(pid)
    return fields is None or fields[0] not in ("Z", "X")


def _owner_alive(owner: Mapping) -> bool:
    if owner.get("host") not in (None, _HOST):
        return True  # another machine's process: cannot be checked from here
    pid, recorded = owner["pid"], owner.get("start")
    if pid == os.getpid() and recorded is None:
        return False  # a bare pid is an earlier version's lock: not this process's
    if not _pid_alive(pid):
        return False
    now = _start_time(pid)
    # same pid, another start time: the pid was reused (pid 1 of a restarted container);
    # the same start time in this very process: another writer of ours holds it
    return recorded is None or now is None or recorded == now


def _atomic_write(df: pl.DataFrame, dest: Path, metadata: Mapping[str, str]) -> None:
    # Serialised in memory, then written by Python: a write the system refuses (a full
    # disk, a quota, a file-size limit) raises OSError with its errno, where polars
    # writing the file itself raises a ComputeError that names it only in its text.
    buf = io.BytesIO()
    df.write_parquet(buf, metadata=dict(metadata))
    with replacing(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())


# Suffixes of other table formats: the result is always parquet, and a parquet file named
# results.csv would only fail later, in whatever reads it as CSV. Any other name is taken.
OTHER_FORMATS = frozenset({
    ".csv", ".tsv", ".txt", ".json", ".jsonl", ".ndjson", ".xlsx", ".xls", ".arrow", ".feather",
    ".ipc", ".avro", ".orc", ".db", ".sqlite",
})


def check_output_name(out: Path | str) -> Path:
    """``out`` as a Path, once it names a file (not "", "." or "..") whose suffix does
    not name another format (:data:`OTHER_FORMATS`)."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise OutputError(f"--out must name a file (results.parquet), got {str(out)!r}")
    if out.suffix.lower() in OTHER_FORMATS:
        raise OutputError(
            f"--out {out}: the results are written as parquet, not {out.suffix.lower()[1:].upper()}; "
            f"name it {out.with_suffix('.parquet').name} (polars.read_parquet(...).write_csv(...) converts it)"
        )
    return out


def _written_path(out: Path | str) -> Path:
    """The file the writer writes for ``out``: ``out``, or a symlink's target (written
    through: the link stays, its target is replaced)."""
    out = check_output_name(out)
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def check_output_folder(out: Path) -> Path:
    """The folder ``out`` goes in, once it exists and is writable (a mistyped folder is
    refused, not made): for every output file the commands write."""
    parent = Path(out).parent
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder is not writable: {parent}")
    return parent


def check_output_target(out: Path | str) -> Path:
    """``out`` once it can be written as a result file (a regular file or none yet, in a
    writable folder, its parts folder not blocked), as the path the writer will write
    (a symlink's target). Cheap: checked before any model is loaded."""
    out = _written_path(out)
    check_output_folder(out)
    if out.is_dir():
        raise OutputError(f"output path is a folder: {out}")
    if out.exists() and not out.is_file():
        # a device, FIFO or socket: the final rename would replace it
        raise OutputError(f"output path is not a regular file: {out}")
    parts = out.with_name(out.name + ".parts")
    if parts.exists() and (parts.is_symlink() or not parts.is_dir()):
        raise OutputError(f"{parts} is in the way of the output's parts folder: move it away")
    return out


def config_difference(stored: str | None, ours: str) -> str:
    """What tells two run records (:func:`engine.runner.run_config_record`) apart, in a few
    words: the precision, the calibration set, the models, or a model's ONNX, weights or
    spec."""
    try:
        old, new = json.loads(stored or "null"), json.loads(ours)
    except ValueError:
        return "its configuration is unreadable"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "models, weights or precision differ"
    if old.get("precision") != new.get("precision"):
        return f"it was made at {old.get('precision')}, this run is {new.get('precision')}"
    if old.get("calibration_sha256") != new.get("calibration_sha256"):
        return "its int8 graphs were calibrated on another set of images (--calib, --calib-count)"
    olds, news = old.get("models") or [], new.get("models") or []
    keys = [[m.get("spec") if isinstance(m, dict) else m for m in ms] for ms in (olds, news)]
    if keys[0] != keys[1]:
        return f"it holds {', '.join(map(str, keys[0])) or 'no models'}, this run {', '.join(map(str, keys[1]))}"
    for a, b in zip(olds, news):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            continue
        if a.get("weights") != b.get("weights"):
            return f"its {a.get('spec')} weights were {a.get('weights')}, this run's are {b.get('weights')}"
        if a.get("onnx_sha256") != b.get("onnx_sha256"):
            return f"its {a.get('spec')} ran another ONNX file (by content)"
        if a.get("spec_sha256") != b.get("spec_sha256"):
            return f"its {a.get('spec')} had another spec (preprocessing, labels or output kind; --spec-file)"
    return "models, weights or precision differ"


def _record_format(config_json: str | None) -> object:
    """The ``record`` format number of a stored configuration (None before there was one)."""
    try:
        data = json.loads(config_json or "null")
    except ValueError:
        return None
    return data.get("record") if isinstance(data, dict) else None


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
        older_config: Mapping[str, object] | None = None,
    ) -> None:
        self.out = _written_path(out)
        self.schema = pl.Schema(schema)
        self.config_json = json.dumps(config, sort_keys=True)
        # The same configuration as the engine recorded it before paths were escaped
        # one to one: resumed unless a path there holds a backslash (written unescaped).
        self.older_config_json = json.dumps(older_config, sort_keys=True) if older_config is not None else None
        self.overwrite = overwrite
        self.part_rows = part_rows
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self._lock = OutputLock(self.out.with_name(self.out.name + ".lock"))
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        self._next_part = 1
        self.rows_written = 0
        self.done: set[str] = set()  # paths classified by an earlier run: skipped
        self.resumed_rows = 0
        self.failed: set[str] = set()  # paths that were only error rows: tried again
        self._write_failed = False  # a part could not be written: not tried again on the way out

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> "ResultWriter":
        check_output_target(self.out)
        self._lock.acquire()
        try:
            if self.overwrite:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                self.out.unlink(missing_ok=True)
            # (the parts folder is made by the first flush: a refused run leaves none)
            # Temp files of a killed run (we hold the lock, so none is being written).
            for stale in [*leftover_temps(self.out), *self.parts_dir.glob(".part-*.tmp")]:
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
                # Keep what is finished: the rows in memory become one more part (unless
                # writing a part is what failed). If that fails too, the run's own error
                # is the one that goes on.
                if not self._write_failed:
                    try:
                        self.flush()
                    except OutputError as failed:
                        log.error("%s", failed)
                try:  # a run that failed before its first part leaves no empty folder
                    self.parts_dir.rmdir()
                except OSError:
                    pass  # not empty (or never made): kept
        finally:
            self._lock.release()

    # -- resume ------------------------------------------------------------------------
    def _existing_files(self) -> list[Path]:
        files = sorted(self.parts_dir.glob("part-*.parquet"))
        if self.out.is_file():
            files.insert(0, self.out)
        return files

    def _load_previous(self) -> None:
        failed: set[str] = set()
        for f in self._existing_files():
            try:
                meta = pl.read_parquet_metadata(f)
                prev = pl.read_parquet(f, columns=["path", "error"])
                paths, errors = prev["path"], prev["error"]
            except Exception as exc:  # a foreign or damaged file: never overwrite silently
                raise OutputError(f"{f} is not a readable result file ({exc}); use --overwrite to start fresh") from None
            stored = meta.get(CONFIG_KEY)
            if stored != self.config_json and stored is not None and stored == self.older_config_json:
                # Both forms write a non-UTF-8 byte as \xNN; the older one wrote a backslash
                # as is. A backslash that is not such an escape names a file whose path is
                # written otherwise now. (A name spelling out "\xNN" itself cannot be told
                # from the byte there: taken for the byte.)
                escaped = paths.filter(paths.str.contains(r"\\(?:[^x]|x[0-9a-f]{0,1}(?:[^0-9a-f]|$)|$)"))
                if len(escaped):
                    raise OutputError(f"{f} was written by an earlier version of the engine, which wrote a "
                                      f"backslash in a path as is ({escaped[0]}): its rows cannot be matched to "
                                      f"files one to one; use --overwrite to start fresh or choose another --out")
            elif stored != self.config_json:
                if _record_format(stored) != _record_format(self.config_json):
                    why = "was written by another version of the engine, which describes its models otherwise"
                else:
                    why = f"holds results of another configuration ({config_difference(stored, self.config_json)})"
                raise OutputError(f"{f} {why}; use --overwrite to start fresh or choose another --out")
            self.done.update(paths.filter(errors.is_null()).to_list())
            failed.update(paths.filter(errors.is_not_null()).to_list())
            if f.parent == self.parts_dir:
                self._next_part = max(self._next_part, int(f.stem.split("-")[1]) + 1)
        self.resumed_rows = len(self.done)
        self.failed = failed - self.done
        if self.resumed_rows:
            log.info("resuming: %d images already in %s", self.resumed_rows, self.out)
        if self.failed:
            log.info("%d images that failed in an earlier run are tried again", len(self.failed))

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

    def flush(self) -> None:
        if not self._buffer:
            return
        df = pl.concat(self._buffer)
        part = self.parts_dir / f"part-{self._next_part:06d}.parquet"
        try:
            self.parts_dir.mkdir(exist_ok=True)
            _atomic_write(df, part, {CONFIG_KEY: self.config_json})
        except OSError as exc:
            self._write_failed = True
            raise OutputError(
                f"cannot write {part}: {exc.strerror or exc}. The rows written before it are kept in {self.parts_dir} "
                f"({self.rows_written} from this run); the last {df.height} are not: run the same command again "
                f"once that is fixed, and it resumes, classifying those again"
            ) from None
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
        try:
            _atomic_write(merged, self.out, {CONFIG_KEY: self.config_json})
        except OSError as exc:
            kept = f"every row is kept in {self.parts_dir}" if self.parts_dir.is_dir() else f"{self.out} is as it was"
            raise OutputError(
                f"cannot write {self.out}: {exc.strerror or exc}. Nothing is lost: {kept}; run the same command again "
                f"once that is fixed, and it skips every image already classified and writes {self.out.name}"
            ) from None
        shutil.rmtree(self.parts_dir, ignore_errors=True)
