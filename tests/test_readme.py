"""The README's examples run as written (the Python API block, on this machine's CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_frames_example():
    blocks = [b for b in _python_blocks() if "FrameClassifier" in b]
    assert len(blocks) == 1, "the frames section's example is gone or split"


def test_the_frames_example_runs_as_written(tmp_path, random_models, model_cache_dir):
    """Run in a fresh folder whose ``model-cache`` (the example's cache path) is the
    session's, so the random-weight exports are not made again; the example's
    iter_classify loop prints each batch's first index and frame."""
    (block,) = [b for b in _python_blocks() if "FrameClassifier" in b]
    for key in random_models:  # exported once per session, before the example looks for them
        random_models[key]
    (tmp_path / "model-cache").symlink_to(model_cache_dir, target_is_directory=True)
    script = tmp_path / "example.py"
    script.write_text(block + "\nprint('RESULTS', len(results), results.to_polars().columns)\n")
    root = str(README.parent)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^0 shape: \(2, \d+\)", proc.stdout, flags=re.M), proc.stdout[-2000:]
    assert "RESULTS 2 ['frame', 'error', " in proc.stdout
    assert "RANDOM weights" in proc.stderr  # the example says it is not the published model
