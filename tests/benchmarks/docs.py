"""Small, schema-valid benchmark results documents built in memory for the tests."""

from __future__ import annotations

import copy
from typing import Mapping

from benchmarks.schema import SCHEMA_VERSION

ENGINE = "engine/onnxruntime/cpu/fp32"
REFERENCE = "reference/torch/cpu/fp32"

# (config, stage, scenario, model) -> median images/s
DEFAULT_FIGURES: dict[tuple[str, str, str | None, str | None], float] = {
    (ENGINE, "preprocess", "gender", None): 200.0,
    (ENGINE, "inference", None, "gender/alpha"): 60.0,
    (ENGINE, "end_to_end", "gender", None): 40.0,
    (REFERENCE, "preprocess", "gender", None): 150.0,
    (REFERENCE, "inference", None, "gender/alpha"): 20.0,
    (REFERENCE, "end_to_end", "gender", None): 15.0,
}


def result(config: str, stage: str, scenario: str | None, model: str | None, median: float, *, peak_host_mb: float = 1000.0, repeats: int = 3) -> dict:
    rates = [median * 0.98, median, median * 1.01][:repeats] if repeats <= 3 else [median] * repeats
    rates = sorted(rates)
    images = 16
    return {
        "config": config,
        "scenario": scenario,
        "stage": stage,
        "model": model,
        "images": images,
        "batch_size": 4,
        "seconds": [images / r for r in rates],
        "images_per_s": {
            "median": sorted(rates)[len(rates) // 2],
            "mean": sum(rates) / len(rates),
            "min": min(rates),
            "max": max(rates),
            "stdev": 0.0,
            "spread_pct": 100.0 * (max(rates) - min(rates)) / median,
        },
        "peak_host_mb": peak_host_mb,
        "peak_host_delta_mb": peak_host_mb / 2,
        "peak_device_mb": None,
        "host_memory_metric": "pss_tree",
        "note": None,
    }


def make_doc(
    figures: Mapping[tuple[str, str, str | None, str | None], float] | None = None,
    *,
    gpu: str | None = None,
    cpu: str = "Test CPU",
    memory: Mapping[tuple, float] | None = None,
    repeats: int = 3,
) -> dict:
    figures = DEFAULT_FIGURES if figures is None else figures
    memory = memory or {}
    configs = []
    for cid in dict.fromkeys(k[0] for k in figures):
        pipeline, backend, device, precision = cid.split("/")
        configs.append(
            {"id": cid, "pipeline": pipeline, "backend": backend, "device": device, "precision": precision, "label": cid, "details": {}}
        )
    return copy.deepcopy(
        {
            "schema_version": SCHEMA_VERSION,
            "suite": {"name": "test", "engine_version": "0.0", "git_commit": None},
            "created_utc": "2026-01-01T00:00:00+00:00",
            "duration_s": 1.0,
            "machine": {
                "hostname": "h",
                "platform": "Linux",
                "python": "3.11",
                "cpu": cpu,
                "cpu_count": 2,
                "usable_cpus": 2,
                "memory_total_mb": 1024.0,
                "load_average": [0.5, 0.5, 0.5],
                "gpu": None
                if gpu is None
                else {"name": gpu, "driver": "1.0", "count": 1, "memory_mb": 80000.0, "compute_capability": "9.0", "cuda_runtime": "13.0"},
            },
            "packages": {"numpy": "2.0", "tensorrt": None},
            "settings": {
                "batch_size": 4,
                "repeats": repeats,
                "rounds": 1,
                "warmup_batches": 1,
                "device": "cuda" if gpu else "cpu",
                "workers": 2,
                "threads": 2,
                "scenarios": ["gender"],
            },
            "images": {"source": "generated", "root": "/tmp/x", "count": 16, "total_bytes": 1, "counts": {"frame.png": 16}, "generator": None},
            "models": [
                {
                    "key": "gender/alpha",
                    "task": "gender",
                    "variant": "alpha",
                    "architecture": "resnet18",
                    "input_size": 224,
                    "labels": ["female", "male"],
                    "weights": "random",
                    "weights_detail": "random",
                    "onnx": None,
                }
            ],
            "configs": configs,
            "skipped": [],
            "results": [result(*k, v, peak_host_mb=memory.get(k, 1000.0), repeats=repeats) for k, v in figures.items()],
            "speedups": [],
            "agreement": [],
            "headline": [],
            "notes": [],
            "outputs": {"json": "/tmp/x/results.json", "plot": None, "plot_skipped": "test", "summary": "/tmp/x/summary.md"},
        }
    )


def scaled(doc: dict, factor: float, *, stage: str | None = None, config: str | None = None) -> dict:
    """A copy of ``doc`` whose matching figures are ``factor`` times faster."""
    out = copy.deepcopy(doc)
    for r in out["results"]:
        if (stage is None or r["stage"] == stage) and (config is None or r["config"] == config):
            r["seconds"] = [s / factor for s in r["seconds"]]
            for k in ("median", "mean", "min", "max", "stdev"):
                r["images_per_s"][k] *= factor
    return out
