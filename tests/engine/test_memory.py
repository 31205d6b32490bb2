"""Bounded memory: peak RSS of `engine run` stays flat when the input grows 10x.

Each run is its own process, so its peak resident set (ru_maxrss) is its own. Printed
with `pytest -s`; figures are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, resource, sys
from engine.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _folder(root: Path, n: int) -> Path:
    root.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        sub = root / f"d{i % 7}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")
    return root


def _peak_mb(folder: Path, out: Path, cache: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["run", str(folder), "--out", str(out), "--only", "gender", "--random-weights", "--no-download",
            "--cache-dir", str(cache), "--batch-size", "8", "--flush-every", "64", "--threads", "2",
            "--no-progress"]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    return report["maxrss_kb"] / 1024


def test_peak_memory_is_flat_when_input_grows_tenfold(tmp_path, random_models, model_cache_dir):
    random_models["gender/alpha"]
    small = _peak_mb(_folder(tmp_path / "small", 40), tmp_path / "s.parquet", model_cache_dir)
    large = _peak_mb(_folder(tmp_path / "large", 400), tmp_path / "l.parquet", model_cache_dir)
    print(f"\npeak RSS: 40 images {small:.0f} MB, 400 images {large:.0f} MB ({large / small:.2f}x)")
    assert large <= small * 1.15 + 30, (small, large)
