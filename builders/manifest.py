"""Engine manifests and the engine cache.

A TensorRT engine is only valid for the exact ONNX graph, precision, batch profile,
GPU (compute capability) and TensorRT version it was built with. Every serialised
engine therefore travels with a JSON manifest recording those facts plus how and when
it was built, and the engine cache is keyed by them: a cached engine built for another
GPU, another TensorRT or a changed ONNX is never returned; asking for it explicitly
raises :class:`~engine.errors.ModelError` naming every field that differs.

This module is pure Python (no TensorRT, no CUDA) so that the cache logic is testable
anywhere; :mod:`builders.trt_build` detects the GPU and TensorRT version and fills
:class:`BuildTarget` in.

Layout of a cache directory::

    <cache_dir>/<model>.<precision>.<key16>.engine
    <cache_dir>/<model>.<precision>.<key16>.json      (the Manifest)
    <cache_dir>/timing.<gpu>.<cc>.trt<version>.cache   (persistent timing cache)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import onnx
from google.protobuf.message import DecodeError

from engine.errors import ModelError
from engine.fileio import write_bytes_atomic

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: ``contexts`` (identical optimisation profiles, one per execution context)
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def onnx_sha256(path: Path) -> str:
    """SHA-256 over an ONNX file and, in order, the external data files it references.

    Editing the weights of a model saved with external data changes the hash even though
    the ``.onnx`` file itself is unchanged.
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise ModelError(f"cannot read ONNX file {path}: {exc}") from exc
    locations: list[str] = []
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in locations:
                    locations.append(entry.value)
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(sha256_file(path)))
    for location in locations:
        data_path = path.parent / location
        if not data_path.is_file():
            raise ModelError(f"ONNX file {path} references external data {location!r}, which is missing")
        digest.update(location.encode())
        digest.update(bytes.fromhex(sha256_file(data_path)))
    return digest.hexdigest()


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


# --------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shapes of one network input in an optimisation profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ModelError(f"profile for {self.name!r}: min/opt/max shapes have different ranks")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (1 <= lo <= mid <= hi):
                raise ModelError(
                    f"profile for {self.name!r}: need 1 <= min <= opt <= max in every dimension, "
                    f"got min={self.min} opt={self.opt} max={self.max}"
                )

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapeRange":
        return cls(
            name=str(data["name"]),
            min=tuple(int(v) for v in data["min"]),
            opt=tuple(int(v) for v in data["opt"]),
            max=tuple(int(v) for v in data["max"]),
        )


# --------------------------------------------------------------------------- target / manifest


@dataclass(frozen=True)
class BuildTarget:
    """What an engine is bound to besides its graph: the GPU and the TensorRT version."""

    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str  # "11.4.0.1"

    def describe(self) -> str:
        return f"{self.gpu_name} (sm {self.compute_capability}), TensorRT {self.tensorrt_version}"


@dataclass(frozen=True)
class Manifest:
    """Everything an engine depends on (the key) plus provenance (not in the key)."""

    model: str  # spec key, e.g. "quality/baseline"
    onnx_sha256: str  # of the *prepared* ONNX the engine was built from
    precision: str  # Precision value: fp32 / fp16 / int8
    profile: tuple[ShapeRange, ...]
    target: BuildTarget
    builder_optimization_level: int
    workspace_bytes: int
    # Copies of ``profile`` in the engine: TensorRT needs one optimisation profile per
    # execution context in concurrent use on a dynamic-shape engine, and the executor
    # runs one context per ring slot.
    contexts: int = 1
    # provenance, not part of the key
    source_onnx_sha256: str = ""
    build_seconds: float = 0.0
    built_at: str = ""  # ISO 8601, UTC
    engine_sha256: str = ""
    engine_file: str = ""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    manifest_version: int = MANIFEST_VERSION

    # Fields that decide whether an engine can be reused, with a human label each.
    KEY_FIELDS = (
        ("model", "model"),
        ("onnx_sha256", "prepared ONNX (sha256)"),
        ("precision", "precision"),
        ("profile", "batch profile"),
        ("gpu_name", "GPU"),
        ("compute_capability", "compute capability"),
        ("tensorrt_version", "TensorRT version"),
        ("builder_optimization_level", "builder optimisation level"),
        ("workspace_bytes", "workspace limit"),
        ("contexts", "concurrent execution contexts"),
        ("manifest_version", "manifest format"),
    )

    def key_values(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "onnx_sha256": self.onnx_sha256,
            "precision": self.precision,
            "profile": [r.as_dict() for r in self.profile],
            "gpu_name": self.target.gpu_name,
            "compute_capability": self.target.compute_capability,
            "tensorrt_version": self.target.tensorrt_version,
            "builder_optimization_level": self.builder_optimization_level,
            "workspace_bytes": self.workspace_bytes,
            "contexts": self.contexts,
            "manifest_version": self.manifest_version,
        }

    @property
    def key(self) -> str:
        """Hex digest over the key fields; two manifests with equal keys are interchangeable."""
        blob = json.dumps(self.key_values(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def stem(self) -> str:
        """File stem of this engine in a cache directory."""
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model)
        return f"{model}.{self.precision}.{self.key[:16]}"

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["profile"] = [r.as_dict() for r in self.profile]
        data["target"] = dataclasses.asdict(self.target)
        data["input_names"] = list(self.input_names)
        data["output_names"] = list(self.output_names)
        data["key"] = self.key
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
            version = int(data.get("manifest_version", 0))
            if version != MANIFEST_VERSION:
                raise ModelError(
                    f"{where}: manifest format {version} is not the supported format {MANIFEST_VERSION}; rebuild the engine"
                )
            return cls(
                model=str(data["model"]),
                onnx_sha256=str(data["onnx_sha256"]),
                precision=str(data["precision"]),
                profile=tuple(ShapeRange.from_dict(r) for r in data["profile"]),
                target=BuildTarget(**{k: str(v) for k, v in data["target"].items()}),
                builder_optimization_level=int(data["builder_optimization_level"]),
                workspace_bytes=int(data["workspace_bytes"]),
                contexts=int(data["contexts"]),
                source_onnx_sha256=str(data.get("source_onnx_sha256", "")),
                build_seconds=float(data.get("build_seconds", 0.0)),
                built_at=str(data.get("built_at", "")),
                engine_sha256=str(data.get("engine_sha256", "")),
                engine_file=str(data.get("engine_file", "")),
                input_names=tuple(data.get("input_names", ())),
                output_names=tuple(data.get("output_names", ())),
                manifest_version=version,
            )
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{where}: not a valid engine manifest ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"cannot read engine manifest {path}: {exc.strerror or exc}") from None
        return cls.from_json(text, where=str(path))

    def write(self, path: Path) -> None:
        write_bytes_atomic(Path(path), self.to_json().encode())


def mismatches(found: Manifest, wanted: Manifest) -> list[str]:
    """Human-readable list of key fields where ``found`` differs from ``wanted``."""
    have, want = found.key_values(), wanted.key_values()
    out = []
    for field_name, label in Manifest.KEY_FIELDS:
        if have[field_name] != want[field_name]:
            out.append(f"{label}: engine has {_short(have[field_name])}, needed {_short(want[field_name])}")
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "..."
    if isinstance(value, list):  # profile
        return "; ".join(f"{r['name']} {r['min']}..{r['opt']}..{r['max']}" for r in value)
    return repr(value) if isinstance(value, str) else str(value)


def mismatch_message(found: Manifest, wanted: Manifest, where: str) -> str:
    diffs = mismatches(found, wanted)
    return f"engine {where} does not match this model/machine ({'; '.join(diffs)}); rebuild it with `engine build`"


def check_engine(engine_path: Path, wanted: Manifest) -> Manifest:
    """Verify that ``engine_path`` (with its ``.json`` manifest beside it) was built for
    ``wanted``; return its manifest, or raise :class:`ModelError` naming what differs.

    ``wanted`` carries the current ONNX hash, precision, profile and build target.
    """
    engine_path = Path(engine_path)
    manifest_path = engine_path.with_suffix(".json")
    if not engine_path.is_file():
        raise ModelError(f"engine file {engine_path} does not exist")
    if not manifest_path.is_file():
        raise ModelError(
            f"engine {engine_path} has no manifest ({manifest_path.name}); an engine of unknown origin is "
            "not used; rebuild it with `engine build`"
        )
    found = Manifest.read(manifest_path)
    if found.key != wanted.key:
        raise ModelError(mismatch_message(found, wanted, str(engine_path)))
    if found.engine_sha256 and sha256_file(engine_path) != found.engine_sha256:
        raise ModelError(f"engine {engine_path} was modified after it was built (hash differs from its manifest)")
    return found


def runtime_differences(found: Manifest, target: BuildTarget) -> list[str]:
    """Where an engine's build target differs from this GPU/TensorRT, one line each."""
    diffs = []
    if found.target.gpu_name != target.gpu_name:
        diffs.append(f"GPU: engine built on {found.target.gpu_name!r}, this is {target.gpu_name!r}")
    if found.target.compute_capability != target.compute_capability:
        diffs.append(
            f"compute capability: engine {found.target.compute_capability}, this GPU {target.compute_capability}"
        )
    if found.target.tensorrt_version != target.tensorrt_version:
        diffs.append(
            f"TensorRT version: engine {found.target.tensorrt_version}, installed {target.tensorrt_version}"
        )
    return diffs


def check_runtime(found: Manifest, target: BuildTarget, where: str) -> None:
    """Raise :class:`ModelError` if an engine's manifest names another GPU or TensorRT."""
    diffs = runtime_differences(found, target)
    if diffs:
        raise ModelError(f"engine {where} cannot run here ({'; '.join(diffs)}); rebuild it with `engine build`")


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class EngineQuery:
    """What `engine run` needs an engine for: ``source_onnx_sha256`` is
    :func:`onnx_sha256` of the model's ONNX before precision preparation."""

    model: str
    source_onnx_sha256: str
    precision: str
    target: BuildTarget
    batch_size: int
    contexts: int = 1  # execution contexts the run keeps in concurrent use (the executor's ring depth)
    fixed_batch: int | None = None  # the model runs only this batch (the run feeds it in pieces)

    def rejects(self, m: Manifest) -> str | None:
        """Why an engine with manifest ``m`` (same model and precision) cannot serve
        this query, or None."""
        if m.source_onnx_sha256 != self.source_onnx_sha256:
            return (
                f"built from another ONNX (sha256 {_short(m.source_onnx_sha256 or '?')}, "
                f"this model is {_short(self.source_onnx_sha256)})"
            )
        diffs = runtime_differences(m, self.target)
        if diffs:
            return "; ".join(diffs)
        for r in m.profile:
            if self.fixed_batch is not None:
                if r.min[0] != self.fixed_batch or r.max[0] != self.fixed_batch:
                    return (f"its batch profile {r.min[0]}..{r.max[0]} is not the fixed batch {self.fixed_batch} "
                            f"the model runs (its rows are not independent at other batch sizes)")
            elif r.min[0] == r.max[0]:
                pass  # an engine of one batch size serves any run, in pieces of it
            elif not r.min[0] <= self.batch_size <= r.max[0]:
                return f"its batch profile {r.min[0]}..{r.max[0]} does not include batch size {self.batch_size}"
        if m.contexts < self.contexts:
            return (f"built for {m.contexts} concurrent execution context(s) (one optimisation profile each), "
                    f"the run needs {self.contexts}")
        return None


@dataclass(frozen=True)
class EngineSearch:
    entry: "CacheEntry | None"
    rejected: tuple[str, ...]  # "<engine file>: <reason>", one per engine passed over


@dataclass(frozen=True)
class CacheEntry:
    engine_path: Path
    manifest: Manifest


class EngineCache:
    """A directory of engines, each next to its manifest, looked up by manifest key."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def paths_for(self, manifest: Manifest) -> tuple[Path, Path]:
        stem = manifest.stem()
        return self.cache_dir / f"{stem}.engine", self.cache_dir / f"{stem}.json"

    def entries(self) -> list[CacheEntry]:
        """Every readable engine/manifest pair; unreadable manifests are logged and skipped."""
        if not self.cache_dir.is_dir():
            return []
        out = []
        for manifest_path in sorted(self.cache_dir.glob("*.json")):
            engine_path = manifest_path.with_suffix(".engine")
            if not engine_path.is_file():
                continue
            try:
                out.append(CacheEntry(engine_path, Manifest.read(manifest_path)))
            except ModelError as exc:
                logger.warning("ignoring engine cache entry %s: %s", manifest_path.name, exc)
        return out

    def lookup(self, wanted: Manifest) -> CacheEntry | None:
        """The cached engine whose key equals ``wanted``'s, verified against its recorded
        hash; None if there is none. Entries for the same model and precision that differ
        (other GPU, TensorRT, ONNX, profile) are logged with the reason and never returned."""
        engine_path, manifest_path = self.paths_for(wanted)
        if engine_path.is_file() and manifest_path.is_file():
            try:
                return CacheEntry(engine_path, check_engine(engine_path, wanted))
            except ModelError as exc:
                logger.warning("not using cached engine: %s", exc)
                return None
        for entry in self.entries():
            m = entry.manifest
            if m.model == wanted.model and m.precision == wanted.precision:
                logger.info(
                    "cached engine %s not reusable (%s)", entry.engine_path.name, "; ".join(mismatches(m, wanted))
                )
        return None

    def find_for_run(self, query: "EngineQuery") -> "EngineSearch":
        """The engine `engine run` should load for ``query``, or None with one reason per
        cached engine of that model and precision that was passed over.

        A run does not know the build options (profile, optimisation level, workspace)
        nor, for INT8, the calibration set, so it matches on what decides whether an
        engine computes this model here: the model, the ONNX the engine was prepared
        from (``source_onnx_sha256``), the precision, the GPU and TensorRT; and the
        profile must accept the run's batch size, and the engine must have a profile for each
        execution context the run keeps (``contexts``). Among several usable engines one
        whose profile admits the batch size goes before one of another single batch size
        (run in pieces or padded), then the one tuned closest to the batch size (profile
        ``opt``), then the newest. Every
        candidate's bytes are checked against the hash in its manifest."""
        usable: list[CacheEntry] = []
        rejected: list[str] = []
        for entry in self.entries():
            m = entry.manifest
            if m.model != query.model or m.precision != query.precision:
                continue
            why = query.rejects(m)
            if why is None:
                try:
                    check_engine(entry.engine_path, m)
                except ModelError as exc:
                    why = str(exc)
            if why is None:
                usable.append(entry)
            else:
                rejected.append(f"{entry.engine_path.name}: {why}")
        if not usable:
            return EngineSearch(None, tuple(rejected))

        def rank(e: CacheEntry) -> tuple[bool, int, str]:
            r = e.manifest.profile[0] if e.manifest.profile else None
            admits = r is not None and r.min[0] <= query.batch_size <= r.max[0]  # else: one batch size, in pieces
            opt = r.opt[0] if r is not None else 0
            return (admits, -abs(opt - query.batch_size), e.manifest.built_at)

        return EngineSearch(max(usable, key=rank), tuple(rejected))

    def store(self, engine_bytes: bytes, manifest: Manifest) -> CacheEntry:
        """Write the engine then its manifest (the manifest last, so that a crash never
        leaves a manifest pointing at a partial engine). Fills in engine hash and file name."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        engine_path, manifest_path = self.paths_for(manifest)
        write_bytes_atomic(engine_path, engine_bytes)
        manifest = dataclasses.replace(
            manifest,
            engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
            engine_file=engine_path.name,
        )
        manifest.write(manifest_path)
        return CacheEntry(engine_path, manifest)
