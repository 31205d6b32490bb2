"""The progress bar of `engine run`: its total is counted beside the run, never before
it, so a huge folder starts classifying at once."""

from __future__ import annotations

import threading

import numpy as np
import polars as pl
import pytest
from PIL import Image

import engine.runner as runner
from engine.models import ModelSource
from engine.runner import ModelChoice, RunConfig, TotalCounter, run
from engine.specs import Task


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(root / f"f{i}.png")
    return root


def _config(folder, out, cache_dir) -> RunConfig:
    source = ModelSource(random_weights=True, download=False)
    return RunConfig(input=folder, out=out, models=(ModelChoice(Task.GENDER, None, source),), cache_dir=cache_dir,
                     batch_size=2, threads=1, progress=True, device="cpu")


def test_the_bar_gets_the_total_of_what_is_left(folder, tmp_path, random_models, model_cache_dir, capsys):
    random_models["gender/alpha"]  # exported once per session, reused by random_weights
    summary = run(_config(folder, tmp_path / "a.parquet", model_cache_dir))
    assert summary.images == 5
    assert "5/5" in capsys.readouterr().err


def test_the_run_does_not_wait_for_the_count(folder, tmp_path, random_models, model_cache_dir, capsys, monkeypatch):
    random_models["gender/alpha"]
    release = threading.Event()
    real = runner.iter_images

    def slow_when_counting(root):
        if threading.current_thread().name == "count-images":
            release.wait(60)  # held until the run has returned
        yield from real(root)

    monkeypatch.setattr(runner, "iter_images", slow_when_counting)
    out = tmp_path / "b.parquet"
    try:
        summary = run(_config(folder, out, model_cache_dir))
        count_was_held = not release.is_set()
    finally:
        release.set()
    assert count_was_held and summary.images == 5
    assert pl.read_parquet(out).height == 5
    assert "/5" not in capsys.readouterr().err  # no total was shown, none was invented


def test_counter_skips_what_is_done_and_never_lowers_the_bar(folder):
    done = {runner.display_path(p) for p in sorted(folder.iterdir())[:2]}
    counter = TotalCounter(folder, done)
    counter._thread.join(10)
    assert counter.total == 3

    class Bar:
        total = None
        n = 4  # a bar already past the count (files added while running)
        refreshed = 0

        def refresh(self):
            self.refreshed += 1

    bar = Bar()
    counter.apply(bar)
    assert bar.total == 4 and bar.refreshed == 1
    counter.apply(bar)
    assert bar.refreshed == 1  # set once


def test_counter_on_a_missing_folder_leaves_no_total(tmp_path, caplog):
    counter = TotalCounter(tmp_path / "gone", set())
    counter._thread.join(10)
    assert counter.total is None
    assert "could not count" in caplog.text
