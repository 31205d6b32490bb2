"""Executor overlap on the GPU, if the executor provides a way to run it.

``engine/executor.py`` (being written beside this kit) has ``measure_overlap(executor,
batches)``; driving it on CUDA needs a CUDA ``DeviceBackend`` (TensorRT cannot be had
here; a torch one may come). This script builds that executor on "cuda" with the PyTorch CUDA backend
(``engine/backends/torch_cuda.py``) and records ``OverlapReport.as_dict()`` per run.
Not run yet: no GPU session so far.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


def gpu_overlap_check(out_dir: str, *, batch: int = 32, batches: int = 12, on_run=None) -> dict:
    """Overlap efficiency of the streamed executor on CUDA with the PyTorch backend standing
    in for TensorRT: random-weight resnet18 (224) and caformer_s36 (384), fp32 and fp16,
    each model alone and both together. Efficiency = slowest stage alone / pipelined.
    A run that raises is recorded with its ``error`` and the others go on; ``on_run(report)``
    is called after each run (main writes the JSON then, so a timeout keeps what finished)."""
    import numpy as np

    from builders.export import build_random_model
    from engine.backends.torch_cuda import TorchCudaBackend
    from engine.executor import ExecutorConfig, StreamedExecutor, measure_overlap
    from engine.specs import SpecRegistry

    reg = SpecRegistry.builtin()
    specs = {s.key: s for s in (reg.get("gender"), reg.get("quality"))}
    rng = np.random.default_rng(0)
    data = {
        k: [rng.standard_normal((batch, 3, s.preprocess.size, s.preprocess.size)).astype(np.float32) for _ in range(batches)]
        for k, s in specs.items()
    }
    report: dict = {"batch": batch, "batches": batches, "runs": []}
    combos = [[k] for k in specs] + [list(specs)]  # each model alone, then both together
    for precision in ("fp32", "fp16"):
        for chosen in combos:
            backends: dict = {}
            try:
                for k in chosen:
                    backends[k] = TorchCudaBackend(
                        build_random_model(specs[k].architecture, specs[k].num_classes, 0),
                        (3, specs[k].preprocess.size, specs[k].preprocess.size),
                        precision=precision,
                        max_batch=batch,
                    )
                with StreamedExecutor(backends, "cuda", ExecutorConfig(batch)) as ex:
                    feed = [{k: data[k][i] for k in chosen} for i in range(batches)]
                    result = measure_overlap(ex, feed).as_dict()
                    result["host_overhead_ms_per_batch"] = {
                        k: s.host_overhead_ms_per_batch for k, s in ex.stats.items()
                    }
                    result["device_ms_per_batch"] = {k: s.device_ms_per_batch for k, s in ex.stats.items()}
                    result["graph_batch"] = {k: ex.graph_batch(k) for k in chosen}
            except Exception as exc:  # one failed run must not cost the others' figures
                log.exception("overlap %s %s failed", precision, "+".join(chosen))
                result = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                for b in backends.values():
                    b.close()
            result.update(models=chosen, precision=precision)
            report["runs"].append(result)
            if on_run is not None:
                on_run(report)
            print(f"overlap {precision} {'+'.join(chosen)}: efficiency {result.get('efficiency')}"
                  + (f" ERROR {result['error']}" if "error" in result else ""))
    return report


def main(out_dir: str) -> int:
    import importlib

    try:
        importlib.import_module("engine.executor")
        importlib.import_module("engine.backends.torch_cuda")
    except ImportError as exc:
        print(f"overlap: skipped: the executor cannot be imported ({exc})")
        return 0
    path = Path(out_dir, "overlap.json")

    def write(report: dict) -> None:
        path.write_text(json.dumps(report, indent=2, default=str))

    report = gpu_overlap_check(out_dir, on_run=write)
    write(report)
    print("overlap:", json.dumps(report, default=str)[:400])
    failed = [r for r in report["runs"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1]))
