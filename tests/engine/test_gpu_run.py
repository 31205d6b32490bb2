"""`engine run --device gpu` end to end on a real GPU (auto-skipped without one).

The GPU path with the PyTorch backend (TensorRT cannot be installed in this workplace):
DALI decoding on the GPU, the streamed executor on pycuda, torch on the slot streams,
rows compared with the CPU path on the same folder. The probability bound covers the
GPU vs CPU DALI resize differences (see test_dali_gpu.py) through random-weight models.
NOT RUN YET: written on a machine without a GPU.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from engine.cli import main

pytestmark = pytest.mark.gpu

pytest.importorskip("pycuda")
torch = pytest.importorskip("torch")


def _run(folder, out, cache, *extra) -> int:
    return main(["run", str(folder), "--out", str(out), "--random-weights", "--no-download", "--cache-dir", str(cache),
                 "--batch-size", "3", "--no-progress", *extra])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_path_rows_match_the_cpu_path(mixed_folder, tmp_path, random_models, model_cache_dir, capsys, precision):
    for key in random_models:
        random_models[key]
    cpu_out, gpu_out = tmp_path / "cpu.parquet", tmp_path / "gpu.parquet"
    assert _run(mixed_folder, cpu_out, model_cache_dir, "--device", "cpu") == 0
    capsys.readouterr()
    assert _run(mixed_folder, gpu_out, model_cache_dir, "--device", "gpu", "--gpu-backend", "torch",
                "--precision", precision) == 0
    captured = capsys.readouterr()
    assert "engine: GPU path (DALI on the GPU, streamed executor, PyTorch on CUDA" in captured.err
    executor_lines = [line for line in captured.out.splitlines() if line.startswith("executor ")]
    assert len(executor_lines) == 2, captured.out
    print("\n".join(executor_lines))

    a, b = pl.read_parquet(cpu_out), pl.read_parquet(gpu_out)
    assert a["path"].to_list() == b["path"].to_list()
    assert a["error"].to_list() == b["error"].to_list()
    assert a.select("width", "height").equals(b.select("width", "height"))
    probs = [c for c in a.columns if "_p_" in c]
    ok = a["error"].is_null().to_numpy()
    diff = np.abs(a.select(probs).to_numpy()[ok] - b.select(probs).to_numpy()[ok])
    print(f"GPU ({precision}) vs CPU path: max |dp| {diff.max():.4f}, mean {diff.mean():.5f}")
    assert diff.max() < 0.05


def test_engine_run_finds_the_engine_engine_build_made(mixed_folder, tmp_path, random_models, model_cache_dir, capsys):
    """TensorRT end to end: where it is installed (never in this workplace)."""
    pytest.importorskip("tensorrt")
    random_models["gender/alpha"]
    cache = tmp_path / "cache"
    common = ["--only", "gender", "--random-weights", "--no-download", "--cache-dir", str(cache)]
    out = tmp_path / "trt.parquet"
    # No engine yet: --device gpu refuses and names the command that builds it.
    assert _run(mixed_folder, out, cache, "--only", "gender", "--device", "gpu") == 2
    assert "build it with: engine build --precision fp16 --only gender --random-weights" in capsys.readouterr().err
    assert main(["build", "--precision", "fp16", *common]) == 0
    capsys.readouterr()
    assert _run(mixed_folder, out, cache, "--only", "gender") == 0  # auto: now the GPU path
    captured = capsys.readouterr()
    assert "engine: GPU path (DALI on the GPU, streamed executor, TensorRT engines, fp16)" in captured.err
    cpu = tmp_path / "cpu.parquet"
    assert _run(mixed_folder, cpu, cache, "--only", "gender", "--device", "cpu") == 0
    a, b = pl.read_parquet(cpu), pl.read_parquet(out)
    assert a["error"].to_list() == b["error"].to_list()
    ok = a["error"].is_null().to_numpy()
    probs = [c for c in a.columns if "_p_" in c]
    assert np.abs(a.select(probs).to_numpy()[ok] - b.select(probs).to_numpy()[ok]).max() < 0.05
