"""engine.fileio: the one temp-then-rename writer behind results, graphs, engines and
manifests."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from engine.fileio import replacing, umask, write_bytes_atomic


def test_umask_is_read_without_changing_it(monkeypatch):
    import engine.fileio

    old = os.umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError("umask() changed the process umask")

        monkeypatch.setattr(engine.fileio.os, "umask", refuse)  # Linux: read from /proc
        assert umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.parametrize("stop", [RuntimeError("the builder died"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_or_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path, stop):
    dest = tmp_path / "engine.plan"
    dest.write_bytes(b"old")
    with pytest.raises(type(stop)):
        with replacing(dest) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"half of the ne")
            raise stop
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_the_temporary_file_is_beside_the_destination_and_renamed_onto_it(tmp_path):
    dest = tmp_path / "m.onnx"
    with replacing(dest) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".m.onnx.")
        assert not dest.exists()
        with open(tmp, "wb") as fh:
            fh.write(b"new")
    assert dest.read_bytes() == b"new" and not os.path.exists(tmp)


def test_written_files_get_the_mode_the_umask_allows(tmp_path):
    old = os.umask(0o002)
    try:
        write_bytes_atomic(tmp_path / "cache" / "manifest.json", b"{}")
    finally:
        os.umask(old)
    path = tmp_path / "cache" / "manifest.json"  # the folder was made
    assert path.read_bytes() == b"{}" and path.stat().st_mode & 0o777 == 0o664


def test_two_writers_of_one_file_never_leave_a_mixture(tmp_path):
    dest = tmp_path / "shared.bin"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    errors = []

    def write(blob):
        try:
            for _ in range(5):
                write_bytes_atomic(dest, blob)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert dest.read_bytes() in blobs
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_leftover_temps_are_those_of_that_destination_only(tmp_path):
    from engine.fileio import leftover_temps

    dest = tmp_path / "results[1].parquet"  # glob characters in the name are taken literally
    killed = tmp_path / ".results[1].parquet.abc123.tmp"
    killed.write_bytes(b"half")
    (tmp_path / ".results1.parquet.x.tmp").write_bytes(b"another file's")
    (tmp_path / ".results[1].parquet.keep").write_bytes(b"not a temp")
    assert leftover_temps(dest) == [killed]
    with replacing(dest) as tmp:
        assert Path(tmp) in leftover_temps(dest)  # the names replacing() gives
        Path(tmp).write_bytes(b"x")
    assert leftover_temps(dest) == [killed]


def test_umask_without_proc_is_read_by_setting_it_back_as_it_was(monkeypatch):
    import engine.fileio

    class NoProc(type(Path())):  # a system without /proc/self/status
        def read_text(self, *args, **kwargs):
            raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(engine.fileio, "Path", NoProc)
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        assert os.umask(old) == 0o027  # the process umask is left as it was
    finally:
        os.umask(old)


def test_a_writer_that_removed_its_temporary_file_and_failed_reports_its_own_error(tmp_path):
    dest = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError, match="the writer's own error"):
        with replacing(dest) as tmp:
            os.unlink(tmp)
            raise RuntimeError("the writer's own error")
    assert list(tmp_path.iterdir()) == []
