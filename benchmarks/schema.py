"""The schema of the suite's JSON, and a validator for it.

``RESULT_SCHEMA`` is plain JSON Schema (the draft 2020-12 keywords ``type``,
``properties``, ``required``, ``additionalProperties``, ``items``, ``enum``,
``minimum``, ``exclusiveMinimum``, ``minItems``, ``const``), so other tools can check a
results file too (``python -m benchmarks schema`` prints it). :func:`validate_results`
checks that subset without a third-party package, then the cross-references a schema
cannot express (every result names a measured configuration, statistics are ordered,
inference results name their model, ...).

Bump ``SCHEMA_VERSION`` on any incompatible change; :mod:`benchmarks.compare` refuses
to compare files of different versions.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1

PIPELINES = ["reference", "engine"]
SCENARIOS = ["gender", "quality", "both"]
STAGES = ["preprocess", "inference", "end_to_end", "engine_run"]
PRECISIONS = ["fp32", "fp16", "int8"]
DEVICES = ["cpu", "cuda"]

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_NONNEG = {"type": "number", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 0}


def _obj(properties: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": extra,
    }


_GPU = _obj(
    {
        "name": _STR,
        "driver": _STR_OR_NULL,
        "count": {"type": "integer", "minimum": 1},
        "memory_mb": _NUM_OR_NULL,
        "compute_capability": _STR_OR_NULL,
        "cuda_runtime": _STR_OR_NULL,
        "pci_bus_id": _STR_OR_NULL,
        "selected_by": {"enum": ["cuda_device_0", "first_listed"]},
    },
    # files written before the GPU was matched by bus id lack the last two
    required=["name", "driver", "count", "memory_mb", "compute_capability", "cuda_runtime"],
)

_STATS = _obj(
    {
        "median": {"type": "number", "exclusiveMinimum": 0},
        "mean": {"type": "number", "exclusiveMinimum": 0},
        "min": {"type": "number", "exclusiveMinimum": 0},
        "max": {"type": "number", "exclusiveMinimum": 0},
        "stdev": _NONNEG,
        "spread_pct": _NONNEG,
    }
)

RESULT_SCHEMA: dict[str, Any] = _obj(
    {
        "schema_version": {"const": SCHEMA_VERSION},
        "suite": _obj({"name": _STR, "engine_version": _STR, "git_commit": _STR_OR_NULL}),
        "created_utc": _STR,
        "duration_s": _NONNEG,
        "machine": _obj(
            {
                "hostname": _STR,
                "platform": _STR,
                "python": _STR,
                "cpu": _STR,
                "cpu_count": {"type": "integer", "minimum": 1},
                "usable_cpus": {"type": "integer", "minimum": 1},
                "memory_total_mb": _NUM_OR_NULL,
                "gpu": {"type": ["object", "null"], **{k: v for k, v in _GPU.items() if k != "type"}},
                "load_average": {"type": ["array", "null"], "items": _NONNEG},
            }
        ),
        "packages": {"type": "object", "additionalProperties": _STR_OR_NULL},
        "settings": _obj(
            {
                "batch_size": {"type": "integer", "minimum": 1},
                "repeats": {"type": "integer", "minimum": 1},
                "rounds": {"type": "integer", "minimum": 1},
                "warmup_batches": _COUNT,
                "device": {"enum": DEVICES},
                "workers": _COUNT,
                "threads": {"type": "integer", "minimum": 1},
                "scenarios": {"type": "array", "items": {"enum": SCENARIOS}, "minItems": 1},
            },
            extra=True,
        ),
        "images": _obj(
            {
                "source": {"enum": ["generated", "folder"]},
                "root": _STR,
                "count": {"type": "integer", "minimum": 1},
                "total_bytes": _COUNT,
                "counts": {"type": "object", "additionalProperties": _COUNT},
                "generator": {"type": ["object", "null"]},
                "excluded": {"type": "object", "additionalProperties": _STR},
                "listing_sha256": _STR,  # sorted (path, size) of the images; older files lack it
            },
            # files written before undecodable images were left out lack "excluded"
            required=["source", "root", "count", "total_bytes", "counts", "generator"],
        ),
        "models": {
            "type": "array",
            "minItems": 1,
            "items": _obj(
                {
                    "key": _STR,
                    "task": {"enum": ["gender", "quality"]},
                    "variant": _STR,
                    "architecture": _STR,
                    "input_size": {"type": "integer", "minimum": 1},
                    "labels": {"type": "array", "items": _STR, "minItems": 2},
                    "weights": _STR,
                    "weights_detail": _STR,
                    "onnx": _STR_OR_NULL,
                    "spec_sha256": _STR,
                },
                # files written before the spec digest was recorded lack it
                required=["key", "task", "variant", "architecture", "input_size", "labels", "weights",
                          "weights_detail", "onnx"],
            ),
        },
        "configs": {
            "type": "array",
            "items": _obj(
                {
                    "id": _STR,
                    "pipeline": {"enum": PIPELINES},
                    "backend": _STR,
                    "device": {"enum": DEVICES},
                    "precision": {"enum": PRECISIONS},
                    "label": _STR,
                    "details": {"type": "object"},
                }
            ),
        },
        "skipped": {"type": "array", "items": _obj({"id": _STR, "reason": _STR})},
        "results": {
            "type": "array",
            "items": _obj(
                {
                    "config": _STR,
                    "scenario": {"enum": SCENARIOS + [None]},
                    "stage": {"enum": STAGES},
                    "model": _STR_OR_NULL,
                    "images": {"type": "integer", "minimum": 1},
                    "batch_size": {"type": "integer", "minimum": 1},
                    "seconds": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1},
                    "images_per_s": _STATS,
                    "peak_host_mb": {"type": "number", "exclusiveMinimum": 0},
                    "peak_host_delta_mb": _NONNEG,
                    "peak_device_mb": _NUM_OR_NULL,
                    "host_memory_metric": {"enum": ["pss_tree", "rss_tree", "ru_maxrss_self"]},
                    "note": _STR_OR_NULL,
                }
            ),
        },
        "speedups": {
            "type": "array",
            "items": _obj(
                {
                    "config": _STR,
                    "reference": _STR,
                    "scenario": {"enum": SCENARIOS + [None]},
                    "stage": {"enum": STAGES},
                    "model": _STR_OR_NULL,
                    "ratio": {"type": "number", "exclusiveMinimum": 0},
                }
            ),
        },
        "agreement": {
            "type": "array",
            "items": _obj(
                {
                    "config": _STR,
                    "reference": _STR,
                    "scenario": {"enum": SCENARIOS},
                    "model": _STR,
                    "images": _COUNT,
                    "argmax_agreement": {"type": ["number", "null"], "minimum": 0},
                    "max_abs_dp": _NUM_OR_NULL,
                }
            ),
        },
        "headline": {
            "type": "array",
            "items": _obj(
                {
                    "scenario": {"enum": SCENARIOS},
                    "device": {"enum": DEVICES},
                    "engine_config": _STR,
                    "engine_images_per_s": {"type": "number", "exclusiveMinimum": 0},
                    "reference_config": _STR,
                    "reference_images_per_s": {"type": "number", "exclusiveMinimum": 0},
                    "ratio": {"type": "number", "exclusiveMinimum": 0},
                }
            ),
        },
        "notes": {"type": "array", "items": _STR},
        "outputs": _obj({"json": _STR, "plot": _STR_OR_NULL, "plot_skipped": _STR_OR_NULL, "summary": _STR}),
    }
)


class SchemaError(ValueError):
    """A results document does not follow the schema; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        super().__init__(f"benchmark results do not follow schema v{SCHEMA_VERSION}: {shown}")
        self.problems = problems


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def check_schema(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Problems of ``value`` against ``schema`` (the keyword subset named above)."""
    problems: list[str] = []
    if "const" in schema and value != schema["const"]:
        return [f"{path}: expected {schema['const']!r}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            return [f"{path}: not a finite number"]
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            problems.append(f"{path}: {value} must be > {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{path}: missing '{key}'")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                problems += check_schema(item, props[key], f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unexpected '{key}'")
            elif isinstance(extra, dict):
                problems += check_schema(item, extra, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{path}: needs at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += check_schema(item, schema["items"], f"{path}[{i}]")
    return problems


def _cross_checks(doc: dict) -> list[str]:
    problems: list[str] = []
    ids = [c["id"] for c in doc["configs"]]
    if len(set(ids)) != len(ids):
        problems.append("configs: duplicate ids")
    known = set(ids)
    models = {m["key"] for m in doc["models"]}
    repeats = doc["settings"]["repeats"] * doc["settings"]["rounds"]
    keys = set()
    for i, r in enumerate(doc["results"]):
        where = f"$.results[{i}]"
        if r["config"] not in known:
            problems.append(f"{where}: unknown config '{r['config']}'")
        if (r["stage"] == "inference") != (r["model"] is not None):
            problems.append(f"{where}: an inference result names its model, other stages none")
        if (r["stage"] == "inference") != (r["scenario"] is None):
            problems.append(f"{where}: only inference results have no scenario")
        if r["model"] is not None and r["model"] not in models:
            problems.append(f"{where}: unknown model '{r['model']}'")
        if len(r["seconds"]) != repeats:
            problems.append(f"{where}: {len(r['seconds'])} timings, settings say {repeats} (repeats x rounds)")
        s = r["images_per_s"]
        if not s["min"] <= s["median"] <= s["max"]:
            problems.append(f"{where}: images_per_s not ordered (min <= median <= max)")
        key = (r["config"], r["scenario"], r["stage"], r["model"])
        if key in keys:
            problems.append(f"{where}: duplicate result {key}")
        keys.add(key)
    for section in ("speedups", "agreement"):
        for i, s in enumerate(doc[section]):
            for field in ("config", "reference"):
                if s[field] not in known:
                    problems.append(f"$.{section}[{i}]: unknown {field} '{s[field]}'")
    for i, h in enumerate(doc["headline"]):
        for field in ("engine_config", "reference_config"):
            if h[field] not in known:
                problems.append(f"$.headline[{i}]: unknown {field} '{h[field]}'")
    return problems


def validate_results(doc: Any) -> None:
    """Raise :class:`SchemaError` listing every problem of ``doc``; return None if valid."""
    problems = check_schema(doc, RESULT_SCHEMA)
    if not problems:
        problems = _cross_checks(doc)
    if problems:
        raise SchemaError(problems)
