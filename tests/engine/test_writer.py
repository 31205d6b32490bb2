import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from engine.errors import OutputError
from engine.writer import ResultWriter

SCHEMA = {"path": pl.String, "error": pl.String, "score": pl.Float32}
CONFIG = {"models": ["m"], "precision": "fp32"}


def rows(names):
    return pl.DataFrame({"path": names, "error": [None] * len(names), "score": [1.0] * len(names)}, schema=SCHEMA)


def test_parts_then_single_atomic_file(tmp_path):
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, CONFIG, part_rows=2) as w:
        w.add(rows(["a", "b"]))  # flushed as part 1
        assert len(list(w.parts_dir.glob("part-*.parquet"))) == 1
        assert not out.exists()
        w.add(rows(["c"]))
    df = pl.read_parquet(out)
    assert df["path"].to_list() == ["a", "b", "c"]
    assert not (tmp_path / "r.parquet.parts").exists()
    assert not (tmp_path / "r.parquet.lock").exists()


def test_interrupted_run_keeps_rows_and_resume_skips_them(tmp_path):
    out = tmp_path / "r.parquet"
    with pytest.raises(KeyboardInterrupt):
        with ResultWriter(out, SCHEMA, CONFIG, part_rows=100) as w:
            w.add(rows(["a", "b"]))
            raise KeyboardInterrupt
    assert not out.exists()
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert w.done == {"a", "b"}
        w.add(rows(["c"]))
    assert sorted(pl.read_parquet(out)["path"].to_list()) == ["a", "b", "c"]
    # a third run over a finished file resumes from the final file itself
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert w.done == {"a", "b", "c"}
        w.add(rows(["d"]))
    assert pl.read_parquet(out)["path"].to_list() == ["a", "b", "c", "d"]


def test_overwrite_starts_fresh(tmp_path):
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
    with ResultWriter(out, SCHEMA, CONFIG, overwrite=True) as w:
        assert w.done == set()
        w.add(rows(["b"]))
    assert pl.read_parquet(out)["path"].to_list() == ["b"]


def test_other_configuration_is_refused(tmp_path):
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
    with pytest.raises(OutputError, match="another configuration"):
        ResultWriter(out, SCHEMA, {"models": ["other"], "precision": "fp32"}).open()
    assert not (tmp_path / "r.parquet.lock").exists()


def test_an_output_of_another_record_format_says_so(tmp_path):
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, {"models": ["m"]}) as w:  # as written before records had a format
        w.add(rows(["a"]))
    with pytest.raises(OutputError, match="another version of the engine"):
        ResultWriter(out, SCHEMA, {"record": 2, "models": ["m"]}).open()
    with pytest.raises(OutputError, match="another configuration"):
        ResultWriter(out, SCHEMA, {"models": ["n"]}).open()


def test_an_output_of_the_record_before_escaped_backslashes_is_resumed_unless_a_path_has_one(tmp_path):
    old = {"record": 2, **CONFIG}
    new = {"record": 3, **CONFIG}
    plain, slashed = tmp_path / "plain.parquet", tmp_path / "slashed.parquet"
    with ResultWriter(plain, SCHEMA, old) as w:
        w.add(rows(["/d/a.png", "/d/caf\\xe9.png"]))  # the byte 0xe9, escaped alike by both records
    with ResultWriter(slashed, SCHEMA, old) as w:
        w.add(rows(["/d/a\\b.png"]))  # a backslash: the new record doubles it
    with ResultWriter(plain, SCHEMA, new, older_config=old) as w:
        assert w.done == {"/d/a.png", "/d/caf\\xe9.png"}
        w.add(rows(["/d/c.png"]))
    assert pl.read_parquet(plain).height == 3
    with ResultWriter(plain, SCHEMA, new, older_config=old) as w:  # now written by the new record
        assert len(w.done) == 3
    with pytest.raises(OutputError, match=r"wrote a backslash in a path as is \(/d/a\\b.png\)"):
        ResultWriter(slashed, SCHEMA, new, older_config=old).open()
    with pytest.raises(OutputError, match="another version of the engine"):
        ResultWriter(slashed, SCHEMA, new).open()  # no older form given: refused as before


@pytest.mark.parametrize("change, words", [
    ({"precision": "int8"}, "it was made at fp32, this run is int8"),
    ({"calibration_sha256": "c2"}, "its int8 graphs were calibrated on another set of images"),
    ({"models": [{"spec": "g/a", "weights": "random", "onnx_sha256": "o", "spec_sha256": "s"}]},
     "it holds g/a, q/b, this run g/a"),
    ({"models": [{"spec": "g/a", "weights": "random", "onnx_sha256": "o2", "spec_sha256": "s"},
                 {"spec": "q/b", "weights": "random", "onnx_sha256": "o", "spec_sha256": "s"}]},
     "its g/a ran another ONNX file"),
    ({"models": [{"spec": "g/a", "weights": "random", "onnx_sha256": "o", "spec_sha256": "s"},
                 {"spec": "q/b", "weights": "checkpoint", "onnx_sha256": "o", "spec_sha256": "s"}]},
     "its q/b weights were random, this run's are checkpoint"),
    ({"models": [{"spec": "g/a", "weights": "random", "onnx_sha256": "o", "spec_sha256": "s2"},
                 {"spec": "q/b", "weights": "random", "onnx_sha256": "o", "spec_sha256": "s"}]},
     "its g/a had another spec"),
])
def test_a_refused_resume_says_what_differs(tmp_path, change, words):
    model = {"weights": "random", "onnx_sha256": "o", "spec_sha256": "s"}
    base = {"record": 3, "precision": "fp32", "calibration_sha256": "c1",
            "models": [{"spec": "g/a", **model}, {"spec": "q/b", **model}]}
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, base) as w:
        w.add(rows(["a"]))
    with pytest.raises(OutputError, match=f"another configuration \\({words}"):
        ResultWriter(out, SCHEMA, {**base, **change}).open()


def test_foreign_file_is_not_overwritten(tmp_path):
    out = tmp_path / "r.parquet"
    out.write_text("not parquet")
    with pytest.raises(OutputError, match="--overwrite"):
        ResultWriter(out, SCHEMA, CONFIG).open()
    assert out.read_text() == "not parquet"


def test_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    out = tmp_path / "r.parquet"
    lock = tmp_path / "r.parquet.lock"
    # a live process holds it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(holder.pid))  # a lock of an earlier version: the bare pid
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            ResultWriter(out, SCHEMA, CONFIG).open()
    finally:
        holder.kill()
        holder.wait()
    # now the owner is dead: the lock is stale
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert f'"pid": {os.getpid()}' in lock.read_text()
        w.add(rows(["a"]))
    assert not lock.exists()


def test_bad_output_location(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        ResultWriter(tmp_path / "nope" / "r.parquet", SCHEMA, CONFIG).open()
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        ResultWriter(tmp_path / "d.parquet", SCHEMA, CONFIG).open()


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "r.parquet"
    parts = tmp_path / "r.parquet.parts"
    parts.mkdir()
    (parts / ".part-000001.parquet.abc.tmp").write_bytes(b"half")
    (tmp_path / ".r.parquet.xyz.tmp").write_bytes(b"half")
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]


def err_rows(names):
    return pl.DataFrame({"path": names, "error": ["boom"] * len(names), "score": [None] * len(names)}, schema=SCHEMA)


def test_error_rows_are_tried_again_on_resume_and_the_new_row_wins(tmp_path):
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
        w.add(err_rows(["b"]))
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert w.done == {"a"} and w.failed == {"b"}
        w.add(rows(["b"]))  # b decodes now
    df = pl.read_parquet(out)
    assert df["path"].to_list() == ["a", "b"] and df["error"].to_list() == [None, None]
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert w.done == {"a", "b"} and w.failed == set()


def test_output_files_get_the_mode_the_umask_allows(tmp_path):
    out = tmp_path / "r.parquet"
    old = os.umask(0o027)
    try:
        with ResultWriter(out, SCHEMA, CONFIG, part_rows=1) as w:
            w.add(rows(["a"]))
            (part,) = w.parts_dir.glob("part-*.parquet")
            assert part.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640


def test_a_symlinked_output_is_written_through_its_link(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.parquet"
    link.symlink_to(tmp_path / "real" / "target.parquet")
    with ResultWriter(link, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
    assert link.is_symlink() and pl.read_parquet(link)["path"].to_list() == ["a"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["target.parquet"]


def test_output_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "f.parquet"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        ResultWriter(fifo, SCHEMA, CONFIG).open()
    assert fifo.exists() and not fifo.is_file()
    with pytest.raises(OutputError, match="not a regular file"):
        ResultWriter("/dev/null", SCHEMA, CONFIG).open()
    for bad in ("", "/", "."):
        with pytest.raises(OutputError, match="must name a file"):
            ResultWriter(bad, SCHEMA, CONFIG)


@pytest.mark.parametrize("name", ["r.csv", "r.tsv", "r.json", "r.jsonl", "r.xlsx", "r.Feather"])
def test_an_output_named_for_another_format_is_refused_before_anything_is_written(name, tmp_path):
    with pytest.raises(OutputError, match=r"written as parquet, not [A-Z]+; name it r\.parquet"):
        ResultWriter(tmp_path / name, SCHEMA, CONFIG)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["r.parquet", "r.pq", "results", "r.2026-12-02", "r.csv.parquet"])
def test_other_output_names_are_taken(name, tmp_path):
    with ResultWriter(tmp_path / name, SCHEMA, CONFIG) as writer:
        writer.add(rows(["a.png"]))
    assert pl.read_parquet(tmp_path / name)["path"].to_list() == ["a.png"]


def test_things_in_the_way_of_the_parts_folder_or_lock_are_user_errors(tmp_path):
    out = tmp_path / "r.parquet"
    (tmp_path / "r.parquet.parts").write_text("a file")
    with pytest.raises(OutputError, match="parts folder"):
        ResultWriter(out, SCHEMA, CONFIG).open()
    (tmp_path / "r.parquet.parts").unlink()
    (tmp_path / "r.parquet.lock").mkdir()
    with pytest.raises(OutputError, match="lock file"):
        ResultWriter(out, SCHEMA, CONFIG).open()


def test_a_refused_or_failed_run_leaves_no_empty_parts_folder(tmp_path):
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
    with pytest.raises(OutputError):
        ResultWriter(out, SCHEMA, {"other": 1}).open()
    with pytest.raises(RuntimeError):
        with ResultWriter(tmp_path / "s.parquet", SCHEMA, CONFIG):
            raise RuntimeError("the models failed to open")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]
    # a failure after a part was written keeps the part
    with pytest.raises(RuntimeError):
        with ResultWriter(tmp_path / "t.parquet", SCHEMA, CONFIG, part_rows=1) as w:
            w.add(rows(["x"]))
            raise RuntimeError
    assert len(list((tmp_path / "t.parquet.parts").glob("part-*.parquet"))) == 1


def _lock_json(pid, start, host=None):
    import json
    import socket

    return json.dumps({"pid": pid, "start": start, "host": host or socket.gethostname()})


def test_lock_records_its_owner_and_a_reused_pid_is_stale(tmp_path):
    from engine.writer import _start_time

    out = tmp_path / "r.parquet"
    lock = tmp_path / "r.parquet.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = _start_time(holder.pid)
        assert isinstance(start, int)
        lock.write_text(_lock_json(holder.pid, start))  # the live owner itself: respected
        with pytest.raises(OutputError, match=f"pid {holder.pid}\\)"):
            ResultWriter(out, SCHEMA, CONFIG).open()
        lock.write_text(_lock_json(holder.pid, start, host="elsewhere"))  # cannot be checked: respected
        with pytest.raises(OutputError, match=f"pid {holder.pid} on elsewhere.*if no run is writing it .*, delete "):
            ResultWriter(out, SCHEMA, CONFIG).open()
        lock.write_text(_lock_json(holder.pid, start - 1))  # the pid now names another process
        with ResultWriter(out, SCHEMA, CONFIG) as w:
            w.add(rows(["a"]))
    finally:
        holder.kill()
        holder.wait()
    # this very process's pid in a lock it does not hold (pid 1 of a restarted container)
    lock.write_text(_lock_json(os.getpid(), 0))
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        import json

        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert json.loads(lock.read_text())["start"] == _start_time(os.getpid())
    with ResultWriter(out, SCHEMA, CONFIG):  # a second writer in this same process is refused
        with pytest.raises(OutputError, match=f"pid {os.getpid()}\\)"):
            ResultWriter(out, SCHEMA, CONFIG).open()
    for junk in (b"\xff\xfe", b"[1, 2]", b"-5"):  # not a lock of ours: stale
        lock.write_bytes(junk)
        with ResultWriter(out, SCHEMA, CONFIG):
            pass


def _wait_until(check, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_zombie_owner_is_dead_and_its_lock_is_taken_over(tmp_path):
    """A run killed with kill -9 whose parent has not reaped it yet is a zombie: kill(pid, 0)
    still succeeds, but it writes nothing any more. The comm of this one holds ') R (' to
    check that the state is read after the last ')'."""
    from engine.writer import _start_time

    out = tmp_path / "r.parquet"
    lock = tmp_path / "r.parquet.lock"
    tricky = "import sys, time; open('/proc/self/comm', 'w').write('a) R (b'); time.sleep(float(sys.argv[1]))"
    # a live owner with such a comm is still respected
    live = subprocess.Popen([sys.executable, "-c", tricky, "30"])
    try:
        comm = Path(f"/proc/{live.pid}/comm")
        _wait_until(lambda: comm.read_text().strip() == "a) R (b", "the child to rename itself")
        lock.write_text(_lock_json(live.pid, _start_time(live.pid)))
        with pytest.raises(OutputError, match=f"pid {live.pid}\\)"):
            ResultWriter(out, SCHEMA, CONFIG).open()
    finally:
        live.kill()
        live.wait()
    # a zombie owner (exited, not waited for) is dead: its lock is stale
    zombie = subprocess.Popen([sys.executable, "-c", tricky, "0"])
    try:
        stat = Path(f"/proc/{zombie.pid}/stat")
        _wait_until(lambda: "a) R (b) Z " in stat.read_text(), "the child to become a zombie")
        start = _start_time(zombie.pid)
        assert isinstance(start, int)
        os.kill(zombie.pid, 0)  # what the lock checked alone: the zombie "exists"
        lock.write_text(_lock_json(zombie.pid, start))
        with ResultWriter(out, SCHEMA, CONFIG) as w:
            assert f'"pid": {os.getpid()}' in lock.read_text()
            w.add(rows(["a"]))
        assert not lock.exists()
    finally:
        zombie.wait()


def test_a_path_retried_in_an_unfinished_run_is_done_not_failed(tmp_path):
    """b failed in a finished run, then decoded in a run killed before its merge: the
    final file holds b's error row and a part holds its good row. b is done (skipped),
    not failed as well (the run would count it as a row of a file gone)."""
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        w.add(rows(["a"]))
        w.add(err_rows(["b"]))
    with pytest.raises(KeyboardInterrupt):
        with ResultWriter(out, SCHEMA, CONFIG, part_rows=100) as w:
            assert w.failed == {"b"}
            w.add(rows(["b"]))
            raise KeyboardInterrupt
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert w.done == {"a", "b"} and w.failed == set()


def test_an_older_record_output_with_a_name_ending_in_a_backslash_is_refused(tmp_path):
    """A trailing backslash is a backslash the older record wrote as is (the new one
    doubles it): its row cannot be matched to its file one to one."""
    old, new = {"record": 2, **CONFIG}, {"record": 3, **CONFIG}
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, old) as w:
        w.add(rows(["/d/a.png", "/d/ends-in-a-backslash\\"]))
    with pytest.raises(OutputError, match=r"wrote a backslash in a path as is \(/d/ends-in-a-backslash\\\)"):
        ResultWriter(out, SCHEMA, new, older_config=old).open()


def test_a_refused_resume_names_another_variant_of_the_same_task(tmp_path):
    """Another model in the same place of the list (say gender/beta for gender/alpha) is
    named as such, not as another ONNX file of the stored model."""
    model = {"weights": "random", "onnx_sha256": "o", "spec_sha256": "s"}
    base = {"record": 3, "precision": "fp32", "calibration_sha256": None, "models": [{"spec": "g/a", **model}]}
    out = tmp_path / "r.parquet"
    with ResultWriter(out, SCHEMA, base) as w:
        w.add(rows(["a"]))
    other = {**base, "models": [{"spec": "g/b", **model, "onnx_sha256": "o2"}]}
    with pytest.raises(OutputError, match=r"another configuration \(it holds g/a, this run g/b\)"):
        ResultWriter(out, SCHEMA, other).open()


def test_a_bare_pid_lock_naming_this_process_is_stale(tmp_path):
    """An earlier version's lock (a bare pid) that names the pid this process now has
    (pid 1 of a restarted container) is not this process's own: taken over."""
    out = tmp_path / "r.parquet"
    lock = tmp_path / "r.parquet.lock"
    lock.write_text(str(os.getpid()))
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert f'"pid": {os.getpid()}' in lock.read_text()
        w.add(rows(["a"]))
    assert pl.read_parquet(out)["path"].to_list() == ["a"] and not lock.exists()


def test_a_symlinked_parts_folder_is_refused(tmp_path):
    """A link in place of the parts folder is refused like a file there: parts written
    through it would be left behind elsewhere, and --overwrite could not clear them."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "r.parquet.parts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="parts folder"):
        ResultWriter(tmp_path / "r.parquet", SCHEMA, CONFIG).open()
    assert list((tmp_path / "elsewhere").iterdir()) == []


# A write the system refuses, for real: under a file-size limit (RLIMIT_FSIZE) write(2)
# fails with EFBIG past it, the way a full disk fails with ENOSPC. It runs in a child
# process so that the limit holds back nothing else. Paths are random hex, so a file's
# size follows its row count: about 8 KB for a part of 4 rows, 14 KB for 8, 32 KB for 20.
_UNDER_A_SIZE_LIMIT = r"""
import logging, resource, signal, sys
from pathlib import Path
import numpy as np, polars as pl
from engine.errors import OutputError
from engine.writer import ResultWriter

logging.basicConfig(level=logging.ERROR, format="LOG %(message)s")
out, limit, chunks, interrupt = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
if limit:  # 0: no limit, print the size of each part and of the merged file instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
schema = {"path": pl.String, "error": pl.String, "score": pl.Float32}
rng = np.random.default_rng(0)
done = 0
try:
    with ResultWriter(out, schema, {"models": ["m"], "precision": "fp32"}, part_rows=4) as w:
        for n in map(int, chunks.split(",")):
            names = [f"{done + i:03d}-" + rng.bytes(1500).hex() for i in range(n)]
            done += n
            w.add(pl.DataFrame({"path": names, "error": [None] * n, "score": [1.0] * n}, schema=schema))
            if not limit:
                print(max(p.stat().st_size for p in out.with_name(out.name + ".parts").glob("part-*.parquet")))
        if interrupt:
            raise KeyboardInterrupt
    if not limit:
        print(out.stat().st_size)
except OutputError as exc:
    print(exc)
    sys.exit(2)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
"""


def _write_under_limit(out, limit, chunks, interrupt=False):
    return subprocess.run([sys.executable, "-c", _UNDER_A_SIZE_LIMIT, str(out), str(limit), chunks,
                           "1" if interrupt else "0"], capture_output=True, text=True, timeout=120)


def _sizes_without_limit(tmp_path, chunks):
    """The size of each part written for ``chunks``, then of the merged file: they depend on
    the polars version, so the limits below are set from them."""
    (tmp_path / "sizes").mkdir()
    r = _write_under_limit(tmp_path / "sizes" / "r.parquet", 0, chunks)
    assert r.returncode == 0, r.stderr
    return [int(line) for line in r.stdout.split()]


def _no_temp_files(folder):
    return [p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def test_a_part_the_system_refuses_is_one_error_naming_what_is_kept(tmp_path):
    out = tmp_path / "r.parquet"
    # the first part (4 rows, ~8 KB) fits under the limit; the second (8 rows, ~14 KB) does not
    first, second, _ = _sizes_without_limit(tmp_path, "4,8")
    assert second > first + 1000
    r = _write_under_limit(out, (first + second) // 2, "4,8")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    msg = r.stdout.strip()
    assert msg.startswith(f"cannot write {out}.parts/part-000002.parquet: File too large.")
    assert "(4 from this run); the last 8 are not" in msg
    assert _no_temp_files(tmp_path) == [] and not (tmp_path / "r.parquet.lock").exists()
    # a rerun resumes from the part that was written, and finishes
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert len(w.done) == 4
    assert pl.read_parquet(out).height == 4


def test_a_merge_the_system_refuses_keeps_every_part_for_the_rerun(tmp_path):
    out = tmp_path / "r.parquet"
    *parts, merged = _sizes_without_limit(tmp_path, "4,4,4,4,4")
    assert merged > max(parts) + 1000
    r = _write_under_limit(out, (max(parts) + merged) // 2, "4,4,4,4,4")  # each part fits, the merge does not
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    msg = r.stdout.strip()
    assert msg.startswith(f"cannot write {out}: File too large. Nothing is lost: every row is kept in {out}.parts")
    assert not out.exists() and _no_temp_files(tmp_path) == []
    parts = sorted(out.with_name("r.parquet.parts").glob("part-*.parquet"))
    assert [pl.read_parquet(p).height for p in parts] == [4] * 5


def test_the_first_part_refused_leaves_no_parts_folder(tmp_path):
    out = tmp_path / "r.parquet"
    r = _write_under_limit(out, 4_000, "4")
    assert r.returncode == 2, r.stderr
    assert "(0 from this run); the last 4 are not" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refused_write_on_the_way_out_does_not_hide_the_runs_own_error(tmp_path):
    out = tmp_path / "r.parquet"
    r = _write_under_limit(out, 4_000, "2", interrupt=True)  # 2 rows stay in memory, then Ctrl-C
    assert r.returncode == 130, r.stderr
    assert r.stdout.strip() == "interrupted"
    assert f"LOG cannot write {out}.parts/part-000001.parquet: File too large." in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r.parquet.lock").exists() and _no_temp_files(tmp_path) == []
