"""Model resolution for the run path: from a spec and what the user passed to one
checked ONNX file with a known origin.

Where the weights come from, first match wins:

1. a user's ONNX file (``--<task>-onnx``);
2. a user's checkpoint (``--<task>-checkpoint``), exported once into the cache;
3. random weights (``--random-weights``, smoke runs and tests), exported once;
4. the published file: the cached copy, else a download (when allowed).

Random weights are never used silently: any ONNX whose metadata says it holds random
weights is reported as :attr:`WeightsKind.RANDOM`, wherever it came from, and a
warning is logged. A fixed-batch graph is made dynamic in the cache when that is
verified safe; otherwise it stays fixed and ``info.input.fixed_batch`` tells the runner.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from enum import Enum
from pathlib import Path

from builders.export import (
    DEFAULT_OPSET,
    META_LABELS,
    META_OUTPUT_KIND,
    META_WEIGHTS,
    META_WEIGHTS_DETAIL,
    WEIGHTS_CHECKPOINT,
    WEIGHTS_RANDOM,
    export_onnx,
    file_sha256,
    random_weights_detail,
)
from builders.hub import alternatives_hint, download_published
from builders.onnx_io import OnnxInfo, inspect_onnx, make_batch_dynamic
from engine.errors import DependencyError, ModelError
from engine.specs import ModelSpec, OutputKind, Task

logger = logging.getLogger(__name__)

RANDOM_SEED = 0
# Bump when the export code changes what it writes, so old cache entries are not reused.
EXPORT_FORMAT = 1


class WeightsKind(str, Enum):
    PUBLISHED = "published"
    CHECKPOINT = "checkpoint"
    USER_ONNX = "user_onnx"
    RANDOM = "random"


@dataclass(frozen=True)
class ModelSource:
    """What the user asked for one model. At most one of ``onnx``, ``checkpoint`` and
    ``random_weights``; none means the published file (downloaded if ``download``)."""

    onnx: Path | None = None
    checkpoint: Path | None = None
    random_weights: bool = False
    download: bool = True

    def __post_init__(self) -> None:
        chosen = [
            name
            for name, on in (
                ("an ONNX file", self.onnx is not None),
                ("a checkpoint", self.checkpoint is not None),
                ("random weights", self.random_weights),
            )
            if on
        ]
        if len(chosen) > 1:
            raise ModelError(f"choose one source of weights per model, got {' and '.join(chosen)}")
        if self.onnx is not None:
            object.__setattr__(self, "onnx", Path(self.onnx).expanduser())
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint).expanduser())


@dataclass(frozen=True)
class ModelChoice:
    """One model as a run selects it: the task, the variant (None: the task's default)
    and where its weights come from. (Defined here, beside :class:`ModelSource`, so that
    code that must not import polars, such as the GPU side of :mod:`engine.frames`, can
    name one; :mod:`engine.runner` re-exports it.)"""

    task: Task
    variant: str | None = None  # None: the task's default variant
    source: ModelSource = field(default_factory=ModelSource)


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    onnx_path: Path
    weights: WeightsKind
    weights_detail: str
    output_kind: OutputKind
    info: OnnxInfo
    # The hash where resolving already read it (the batching check of a user's file).
    known_sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def is_random(self) -> bool:
        return self.weights is WeightsKind.RANDOM

    @cached_property
    def source_sha256(self) -> str:
        """:func:`builders.manifest.onnx_sha256` of ``onnx_path`` (external data
        included), read once: the run record, the prepared graph's cache key and the
        engine lookup all name the model by this one reading, and a large graph is not
        parsed three times. (A file replaced after this reading: ``prepare`` refuses to
        cache a graph made from other content than the hash says.)"""
        if self.known_sha256 is not None:
            return self.known_sha256
        from builders.manifest import onnx_sha256

        return onnx_sha256(self.onnx_path)


def default_cache_dir() -> Path:
    env = os.environ.get("ENGINE_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "anime-batch-engine"


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise DependencyError("torch", "torch", "Exporting models") from None


def _export_path(spec: ModelSpec, cache_dir: Path, tag: str) -> Path:
    size = spec.preprocess.size
    name = (
        f"{spec.architecture.value}-{spec.num_classes}cls-{size}px-{tag}-logits-"
        f"opset{DEFAULT_OPSET}-torch{_torch_version()}-v{EXPORT_FORMAT}.onnx"
    )
    return cache_dir / "exports" / name


def _cached_export(spec: ModelSpec, cache_dir: Path, *, checkpoint: Path | None, seed: int | None) -> Path:
    if checkpoint is not None:
        if checkpoint.is_dir():
            raise ModelError(f"{spec.key}: checkpoint {checkpoint} is a folder; name the checkpoint file in it")
        if not checkpoint.is_file():
            raise ModelError(f"{spec.key}: checkpoint {checkpoint} does not exist")
        sha = file_sha256(checkpoint)
        path, detail = _export_path(spec, cache_dir, f"ckpt{sha[:24]}"), f"checkpoint sha256:{sha}"
    else:
        path, detail = _export_path(spec, cache_dir, f"seed{seed}"), random_weights_detail(int(seed))
    if path.is_file():
        try:
            cached = inspect_onnx(path)
        except ModelError as exc:
            logger.warning("cached export %s is unusable (%s); exporting again", path, exc)
        else:
            if cached.metadata.get(META_WEIGHTS_DETAIL) == detail:
                logger.info("%s: reusing cached export %s", spec.key, path)
                return path
            logger.warning("cached export %s holds other weights; exporting again", path)
    try:
        return export_onnx(spec, path, checkpoint=checkpoint, random_seed=seed if checkpoint is None else None)
    except OSError as exc:
        raise ModelError(f"cannot write the exported model to {path}: {exc.strerror or exc} (set ENGINE_CACHE_DIR)") from None


def _published_path(spec: ModelSpec, source: ModelSource, cache_dir: Path) -> Path:
    if spec.hub is None:
        raise ModelError(f"{spec.key} has no published file: {alternatives_hint(spec)}")
    folder = cache_dir / "published" / spec.hub.repo
    cached = folder / spec.hub.filename
    if cached.is_file():
        return cached
    if not source.download:
        raise ModelError(
            f"{spec.key}: the published {spec.hub.repo}/{spec.hub.filename} is not cached at {cached} "
            f"and downloading is off: {alternatives_hint(spec)}"
        )
    return download_published(spec, folder)


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _check_matches_spec(spec: ModelSpec, info: OnnxInfo) -> None:
    size = spec.preprocess.size
    shape = info.input.shape
    if (
        len(shape) != 4
        or shape[1] not in (None, 3)
        or any(d is not None and d != size for d in shape[2:])
    ):
        raise ModelError(
            f"{spec.key}: {info.path} takes input '{info.input.name}' of shape {_fmt_shape(shape)}, "
            f"but the spec expects (N, 3, {size}, {size})"
        )
    if info.input.dtype.kind != "f":
        raise ModelError(f"{spec.key}: {info.path} takes {info.input.dtype} input; a float input is expected")
    out = info.output.shape
    if len(out) != 2 or (out[1] is not None and out[1] != spec.num_classes):
        raise ModelError(
            f"{spec.key}: {info.path} gives output '{info.output.name}' of shape {_fmt_shape(out)}, "
            f"but the spec has {spec.num_classes} labels {list(spec.labels)}"
        )


def _with_shapes(info: OnnxInfo, input_shape: tuple, output_shape: tuple) -> OnnxInfo:
    return dataclasses.replace(info, input=dataclasses.replace(info.input, shape=input_shape),
                               output=dataclasses.replace(info.output, shape=output_shape))


def _pinned_to_spec(spec: ModelSpec, info: OnnxInfo) -> OnnxInfo:
    """``info`` with the dimensions a graph leaves dynamic besides the batch (a user's
    ONNX with dynamic height/width, or classes) filled in from the spec: what the model
    is fed and gives here. The executors allocate their buffers from these shapes."""
    size = spec.preprocess.size
    inp, out = info.input, info.output
    pinned_in = (inp.shape[0], 3, size, size)
    pinned_out = (out.shape[0], spec.num_classes)
    if inp.shape == pinned_in and out.shape == pinned_out:
        return info
    return _with_shapes(info, pinned_in, pinned_out)


def _output_kind(spec: ModelSpec, info: OnnxInfo) -> OutputKind:
    declared = info.metadata.get(META_OUTPUT_KIND)
    if declared is None:
        return spec.output
    try:
        return OutputKind(declared)
    except ValueError:
        logger.warning("%s: ignoring unknown %s=%r in its metadata", info.path, META_OUTPUT_KIND, declared)
        return spec.output


def _with_dynamic_batch(spec: ModelSpec, info: OnnxInfo, cache_dir: Path) -> OnnxInfo:
    src = info.path
    folder = cache_dir / "dynamic"
    from builders.manifest import onnx_sha256

    stem = f"{src.stem}-{onnx_sha256(src)[:16]}"  # external data included: new weights, new copy
    dst, marker = folder / f"{stem}.onnx", folder / f"{stem}.fixed"
    if not dst.is_file() and not marker.is_file():
        try:
            if not make_batch_dynamic(src, dst):
                folder.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{src} cannot run with a dynamic batch\n", encoding="utf-8")
        except OSError as exc:
            raise ModelError(f"cannot write the model cache {folder}: {exc.strerror or exc} (set ENGINE_CACHE_DIR)") from None
    if dst.is_file():
        logger.info("%s: %s has a fixed batch of %d; using its dynamic-batch copy %s", spec.key, src, info.input.fixed_batch, dst)
        return inspect_onnx(dst)
    logger.warning(
        "%s: %s is pinned to a batch of %d and cannot be made dynamic; it runs at that batch",
        spec.key,
        src,
        info.input.fixed_batch,
    )
    return info


def _checked_batching(spec: ModelSpec, info: OnnxInfo, cache_dir: Path, sha256: str) -> OnnxInfo:
    """``info``, or, for a graph declared with a dynamic batch that does not give at
    batch 2 what it gives image by image (the batch baked in, or rows mixed), ``info``
    pinned to a batch of 1, so that it runs one image at a time and every row is its
    own. Checked once per file content (``sha256``; a marker under ``cache_dir/batching``)."""
    from builders.onnx_io import batches_cleanly

    folder = cache_dir / "batching"
    good, bad = folder / f"{sha256[:32]}.batches", folder / f"{sha256[:32]}.one-at-a-time"
    if good.is_file():
        return info
    clean = False
    if not bad.is_file():
        clean = batches_cleanly(info.path, info.input)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (good if clean else bad).write_text(f"{info.path}\n", encoding="utf-8")
        except OSError as exc:
            logger.debug("cannot record the batching check in %s: %s", folder, exc)
    if clean:
        return info
    logger.warning("%s: %s does not give at batch 2 what it gives image by image (its batch is baked in, or "
                   "rows are mixed): it runs one image at a time", spec.key, info.path)
    return _with_shapes(info, (1, *info.input.shape[1:]), (1, *info.output.shape[1:]))


def resolve_model(spec: ModelSpec, source: ModelSource | None = None, cache_dir: Path | None = None) -> ResolvedModel:
    """Find, export or download the ONNX file for ``spec`` as ``source`` asks, check it
    against the spec, and say where its weights come from."""
    source = source or ModelSource()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if source.onnx is not None:
        if source.onnx.is_dir():
            raise ModelError(f"{spec.key}: {source.onnx} is a folder; name the .onnx file in it")
        if not source.onnx.is_file():
            raise ModelError(f"{spec.key}: ONNX file {source.onnx} does not exist")
        path, weights, detail = source.onnx, WeightsKind.USER_ONNX, f"user ONNX {source.onnx}"
    elif source.checkpoint is not None:
        path = _cached_export(spec, cache_dir, checkpoint=source.checkpoint, seed=None)
        weights, detail = WeightsKind.CHECKPOINT, f"checkpoint {source.checkpoint}"
    elif source.random_weights:
        path = _cached_export(spec, cache_dir, checkpoint=None, seed=RANDOM_SEED)
        weights, detail = WeightsKind.RANDOM, random_weights_detail(RANDOM_SEED)
    else:
        path = _published_path(spec, source, cache_dir)
        weights, detail = WeightsKind.PUBLISHED, f"published {spec.published_as} ({path})"

    info = inspect_onnx(path)
    meta = info.metadata
    if meta.get(META_WEIGHTS) == WEIGHTS_RANDOM:
        weights = WeightsKind.RANDOM
        detail = meta.get(META_WEIGHTS_DETAIL) or random_weights_detail(RANDOM_SEED)
    elif meta.get(META_WEIGHTS) == WEIGHTS_CHECKPOINT and META_WEIGHTS_DETAIL in meta:
        detail = f"{detail} ({meta[META_WEIGHTS_DETAIL]})"
    if weights is WeightsKind.USER_ONNX and META_LABELS in meta:
        try:
            labels = json.loads(meta[META_LABELS])
        except ValueError:
            labels = None
        if labels is not None and list(labels) != list(spec.labels):
            logger.warning("%s: %s was exported with labels %s, the spec says %s", spec.key, path, labels, list(spec.labels))

    _check_matches_spec(spec, info)
    # A copy made dynamic from a batch of 1 was checked at batch 2 against the original run
    # image by image (make_batch_dynamic); from a larger fixed batch the original itself
    # may mix its rows, so the copy is checked like any dynamic graph.
    fixed = info.input.fixed_batch
    verified = False
    if fixed is not None:
        info = _with_dynamic_batch(spec, info, cache_dir)
        verified = info.path != path and fixed == 1
    info = _pinned_to_spec(spec, info)
    sha256 = None
    # this engine's own exports batch by construction; users' and published files are checked
    if info.input.fixed_batch is None and weights in (WeightsKind.USER_ONNX, WeightsKind.PUBLISHED):
        from builders.manifest import onnx_sha256

        sha256 = onnx_sha256(info.path)
        if not verified:
            info = _checked_batching(spec, info, cache_dir, sha256)

    resolved = ResolvedModel(
        spec=spec,
        onnx_path=info.path,
        weights=weights,
        weights_detail=detail,
        output_kind=_output_kind(spec, info),
        info=info,
        known_sha256=sha256,
    )
    if resolved.is_random:
        logger.warning("%s runs with RANDOM weights (%s): its predictions mean nothing", spec.key, detail)
    else:
        logger.info("%s: %s, %s output, %s", spec.key, detail, resolved.output_kind.value, info.path)
    return resolved
