import os
import subprocess
import sys

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
        lock.write_text(str(holder.pid))
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            ResultWriter(out, SCHEMA, CONFIG).open()
    finally:
        holder.kill()
        holder.wait()
    # now the owner is dead: the lock is stale
    with ResultWriter(out, SCHEMA, CONFIG) as w:
        assert lock.read_text() == str(os.getpid())
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
