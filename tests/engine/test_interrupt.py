"""Killed and interrupted runs: rerunning gives exactly the rows of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

N_IMAGES = 24
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-frames")
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        arr = rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:03d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


@pytest.fixture(scope="module")
def cache(random_models, model_cache_dir):
    random_models["gender/alpha"]  # export once; the subprocesses reuse the cache
    return model_cache_dir


def _cmd(folder, out, cache):
    return [sys.executable, "-m", "engine", "run", str(folder), "--out", str(out), "--only", "gender",
            "--random-weights", "--no-download", "--cache-dir", str(cache), "--batch-size", "2",
            "--flush-every", "2", "--threads", "1", "--no-progress"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _parts(out: Path) -> int:
    d = out.with_name(out.name + ".parts")
    return len(list(d.glob("part-*.parquet"))) if d.is_dir() else 0


def _start_and_wait(folder, out, cache, min_parts: int, timeout: float = 120.0) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(folder, out, cache), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while _parts(out) < min_parts:
        if proc.poll() is not None:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("run made no progress")
        time.sleep(0.02)
    return proc


def _finish(folder, out, cache) -> None:
    done = subprocess.run(_cmd(folder, out, cache), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def reference(folder, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    _finish(folder, out, cache)
    return pl.read_parquet(out).sort("path")


def _same_rows(df: pl.DataFrame, ref: pl.DataFrame) -> None:
    df = df.sort("path")
    assert df["path"].to_list() == ref["path"].to_list()  # each input exactly once
    assert df["error"].to_list() == ref["error"].to_list()
    np.testing.assert_allclose(
        df["gender_p_female"].fill_null(-1).to_numpy(), ref["gender_p_female"].fill_null(-1).to_numpy(), atol=1e-5
    )


@pytest.mark.parametrize("min_parts", [0, 1, 5])
def test_sigkill_then_rerun_gives_the_same_rows(folder, cache, reference, tmp_path, min_parts):
    out = tmp_path / "r.parquet"
    proc = _start_and_wait(folder, out, cache, min_parts)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reference.height == N_IMAGES + 1
    if min_parts:
        assert _parts(out) >= min_parts and not out.exists()
    # the lock of the killed process is stale and must not block the rerun
    _finish(folder, out, cache)
    _same_rows(pl.read_parquet(out), reference)
    assert not out.with_name(out.name + ".parts").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_sigterm_sighup_and_ctrl_c_flush_and_say_how_to_resume(folder, cache, reference, tmp_path, signum):
    out = tmp_path / "r.parquet"
    proc = _start_and_wait(folder, out, cache, 1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signum  # as a shell reports a process the signal ended
    assert b"Run the same command again to resume" in err
    assert not out.with_name(out.name + ".lock").exists()
    _finish(folder, out, cache)
    _same_rows(pl.read_parquet(out), reference)
