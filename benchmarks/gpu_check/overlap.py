"""Executor overlap on the GPU, if the executor provides a way to run it.

``engine/executor.py`` (being written beside this kit) has ``measure_overlap(executor,
batches)``; driving it on CUDA needs a CUDA ``DeviceBackend`` (TensorRT cannot be had
here; a torch one may come). This script calls ``engine.executor.gpu_overlap_check(out_dir)``
when the executor's owner provides it (it should build an executor on "cuda", call
``measure_overlap`` and return ``OverlapReport.as_dict()``), and otherwise says why it
skipped. Exit status 0 either way unless the check itself fails.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


def main(out_dir: str) -> int:
    import importlib

    try:
        executor = importlib.import_module("engine.executor")
    except ImportError as exc:
        print(f"overlap: skipped: engine.executor cannot be imported ({exc})")
        return 0
    if not hasattr(executor, "measure_overlap"):
        print("overlap: skipped: engine.executor has no measure_overlap")
        return 0
    entry = getattr(executor, "gpu_overlap_check", None)
    if entry is None:
        print(
            "overlap: skipped: measure_overlap is there, but engine.executor.gpu_overlap_check(out_dir) "
            "(an executor on 'cuda' with a CUDA DeviceBackend) is not defined yet"
        )
        return 0
    report = entry(out_dir)
    Path(out_dir, "overlap.json").write_text(json.dumps(report, indent=2, default=str))
    print("overlap:", json.dumps(report, default=str)[:400])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1]))
