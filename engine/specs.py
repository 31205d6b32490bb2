"""Model specs: everything about a model that is data rather than code.

Each published variant gets one frozen :class:`ModelSpec` holding its architecture,
labels, output semantics and preprocessing. Facts that the public model cards do not
confirm are listed in ``ModelSpec.unconfirmed`` (dotted field names) instead of being
silently assumed; ``engine models`` shows them, and a user who knows better overrides
them from a TOML file (which also clears the "unconfirmed" mark for what they set).

Override file format (every key optional; a new variant names its ``base``)::

    [gender.alpha]
    output = "logits"

    [gender.alpha.preprocess]
    channel_order = "bgr"
    mean = [0.5, 0.5, 0.5]
    std = [0.5, 0.5, 0.5]

    [quality.my_finetune]
    base = "quality/head_crop"
    labels = ["bad", "fine", "great", "superb"]
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from engine.errors import SpecError


class Task(str, Enum):
    GENDER = "gender"
    QUALITY = "quality"


class Architecture(str, Enum):
    RESNET18 = "resnet18"
    RESNET50 = "resnet50"
    CAFORMER_S36 = "caformer_s36"


class ResizeRule(str, Enum):
    SHORT_SIDE = "short_side"  # scale so the short side equals size, keep aspect, then crop
    SQUASH = "squash"  # scale both sides to size, aspect ratio not kept


class CropPosition(str, Enum):
    TOP_LEFT = "top_left"
    CENTER = "center"


class Interpolation(str, Enum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


class ChannelOrder(str, Enum):
    RGB = "rgb"
    BGR = "bgr"


class AlphaMode(str, Enum):
    DROP = "drop"  # ignore alpha, keep the stored colour (what OpenCV's imread does)
    WHITE = "white"  # composite over a white background
    BLACK = "black"  # composite over a black background


class OutputKind(str, Enum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How one model sees an image. Pixel values are scaled to [0, 1] before
    ``(x - mean) / std``; mean and std are in that [0, 1] unit."""

    size: int
    resize: ResizeRule
    crop: CropPosition
    interpolation: Interpolation
    channel_order: ChannelOrder
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    alpha: AlphaMode
    # Whether shrinking low-pass filters first. PIL (timm) does; OpenCV's cv2.resize, which
    # the gender card uses, does not, and matching it needs antialias off.
    antialias: bool = True

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step, before the crop.

        The short side becomes ``size``; the long side is ``int(long * size / short)``,
        the truncating rule torchvision's ``Resize(int)`` uses. Every implementation
        (reference, DALI, kernels) calls this so they agree to the pixel.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"image has no pixels ({height}x{width})")
        if self.resize is ResizeRule.SQUASH:
            return self.size, self.size
        if height <= width:
            return self.size, max(self.size, int(width * self.size / height))
        return max(self.size, int(height * self.size / width)), self.size

    def crop_origin(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the size x size crop inside the resized image."""
        if self.crop is CropPosition.TOP_LEFT:
            return 0, 0
        return int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))


@dataclass(frozen=True)
class HubSource:
    """Where the published ONNX lives on the model hub (path not always confirmed)."""

    repo: str
    filename: str


@dataclass(frozen=True)
class ModelSpec:
    task: Task
    variant: str
    architecture: Architecture
    labels: tuple[str, ...]
    output: OutputKind
    preprocess: Preprocess
    published_as: str
    hub: HubSource | None = None
    unconfirmed: frozenset[str] = field(default_factory=frozenset)
    notes: str = ""

    @property
    def key(self) -> str:
        return f"{self.task.value}/{self.variant}"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def is_confirmed(self, field_name: str) -> bool:
        return field_name not in self.unconfirmed


_GENDER_PRE = Preprocess(
    size=224,
    resize=ResizeRule.SHORT_SIDE,
    crop=CropPosition.TOP_LEFT,
    interpolation=Interpolation.LANCZOS,
    channel_order=ChannelOrder.RGB,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    alpha=AlphaMode.DROP,
    antialias=False,
)
_GENDER_UNCONFIRMED = frozenset(
    {"output", "preprocess.channel_order", "preprocess.mean", "preprocess.std", "hub.filename"}
)
_GENDER_NOTES = (
    "Card's use.py: OpenCV read (BGR), short side to 224 with Lanczos (cv2.resize: no antialiasing), "
    "top-left 224x224 crop. "
    "Channel swap, normalisation and softmax are not confirmed; the defaults follow the "
    "predecessor (ToTensor only, softmax appended to the network). ONNX tensor names are "
    "read from the graph."
)

_QUALITY_PRE = Preprocess(
    size=384,
    resize=ResizeRule.SHORT_SIDE,
    crop=CropPosition.CENTER,
    interpolation=Interpolation.BICUBIC,
    channel_order=ChannelOrder.RGB,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    alpha=AlphaMode.WHITE,
)
_QUALITY_NOTES = (
    "timm eval transform (bicubic short side 384, centre crop, ImageNet mean/std, RGBA on white). "
    "Whether the published ONNX ends in softmax is not confirmed."
)

BUILTIN_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        task=Task.GENDER,
        variant="alpha",
        architecture=Architecture.RESNET18,
        labels=("female", "male"),
        output=OutputKind.PROBABILITIES,
        preprocess=_GENDER_PRE,
        published_as="animeGender-dvgg-0.8 alpha (resnet_tiny_418.onnx, 44.8 MB)",
        hub=HubSource("DOFOFFICIAL/animeGender-dvgg-0.8", "resnet_tiny_418.onnx"),
        unconfirmed=_GENDER_UNCONFIRMED | {"architecture"},
        notes=_GENDER_NOTES + " Architecture inferred from file size (resnet18, fc 512->2).",
    ),
    ModelSpec(
        task=Task.GENDER,
        variant="beta",
        architecture=Architecture.RESNET50,
        labels=("female", "male"),
        output=OutputKind.PROBABILITIES,
        preprocess=_GENDER_PRE,
        published_as="animeGender-dvgg-0.8 beta 'resnet_tiny50' (resnet_tiny50_112.onnx, 94.4 MB)",
        hub=HubSource("DOFOFFICIAL/animeGender-dvgg-0.8", "resnet_tiny50_112.onnx"),
        unconfirmed=_GENDER_UNCONFIRMED | {"architecture"},
        notes=_GENDER_NOTES + " Architecture inferred from file size (resnet50, fc 2048->2).",
    ),
    ModelSpec(
        task=Task.QUALITY,
        variant="baseline",
        architecture=Architecture.CAFORMER_S36,
        labels=("poor", "ok", "good", "excellent"),
        output=OutputKind.PROBABILITIES,
        preprocess=_QUALITY_PRE,
        published_as="cls-bangumibase-face-quality.caformer_s36",
        hub=HubSource("deepghs-cv/cls-bangumibase-face-quality.caformer_s36", "model.onnx"),
        unconfirmed=frozenset({"output"}),
        notes=_QUALITY_NOTES
        + " Framing shortcut: this baseline reads how much of the frame the head fills and "
        "collapses to chance on tight head crops; use quality/head_crop for crops.",
    ),
    ModelSpec(
        task=Task.QUALITY,
        variant="head_crop",
        architecture=Architecture.CAFORMER_S36,
        labels=("poor", "ok", "good", "excellent"),
        output=OutputKind.PROBABILITIES,
        preprocess=_QUALITY_PRE,
        published_as="cls-bangumibase-face-quality.caformer_s36.head_crop",
        hub=HubSource("deepghs-cv/cls-bangumibase-face-quality.caformer_s36.head_crop", "model.onnx"),
        unconfirmed=frozenset({"output", "hub.repo"}),
        notes=_QUALITY_NOTES + " Trained to be robust to tight head crops (the card's fix for the framing shortcut).",
    ),
)

DEFAULT_VARIANTS: Mapping[Task, str] = {Task.GENDER: "alpha", Task.QUALITY: "baseline"}


class SpecRegistry:
    """The specs in force: the built-ins, with a user's overrides applied."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.key] = spec

    @classmethod
    def builtin(cls) -> "SpecRegistry":
        return cls(BUILTIN_SPECS)

    @classmethod
    def load(cls, override_file: Path | None = None) -> "SpecRegistry":
        registry = cls.builtin()
        if override_file is not None:
            registry = registry.with_overrides(read_override_file(override_file), source=str(override_file))
        return registry

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def variants(self, task: Task) -> list[str]:
        return [s.variant for s in self._specs.values() if s.task is task]

    def get(self, task: Task | str, variant: str | None = None) -> ModelSpec:
        task = _enum(Task, task, "task")
        variant = variant or DEFAULT_VARIANTS[task]
        try:
            return self._specs[f"{task.value}/{variant}"]
        except KeyError:
            known = ", ".join(self.variants(task))
            raise SpecError(f"unknown {task.value} variant '{variant}' (known: {known})") from None

    def with_overrides(self, data: Mapping[str, Any], source: str = "override") -> "SpecRegistry":
        specs = dict(self._specs)
        for task_name, variants in data.items():
            task = _enum(Task, task_name, f"{source}: task")
            if not isinstance(variants, Mapping):
                raise SpecError(f"{source}: [{task_name}] must be a table of variants")
            for variant, fields in variants.items():
                if not isinstance(fields, Mapping):
                    raise SpecError(f"{source}: [{task_name}.{variant}] must be a table")
                key = f"{task.value}/{variant}"
                fields = dict(fields)
                base_key = fields.pop("base", None)
                if base_key == key:
                    base_key = None  # based on itself: an override of the variant, hub source kept
                if base_key is not None:
                    if not isinstance(base_key, str):
                        raise SpecError(f"{source}: [{task_name}.{variant}] base must be a spec name such as "
                                        f"\"{task.value}/{DEFAULT_VARIANTS[task]}\", got {base_key!r}")
                    if base_key not in specs:
                        raise SpecError(f"{source}: [{task_name}.{variant}] base '{base_key}' is not a known spec")
                    # a new variant: the base's preprocessing, labels and architecture, not
                    # its published file (name, hub source and what is unconfirmed about it)
                    based = specs[base_key]
                    base = dataclasses.replace(
                        based, variant=variant, hub=None,
                        published_as=f"none (a variant based on {base_key})",
                        unconfirmed=frozenset(f for f in based.unconfirmed if not f.startswith("hub.")),
                    )
                    if base.task is not task:
                        raise SpecError(f"{source}: [{task_name}.{variant}] base '{base_key}' is another task")
                elif key in specs:
                    base = specs[key]
                else:
                    raise SpecError(
                        f"{source}: [{task_name}.{variant}] is not a built-in variant; "
                        f"add base = \"{task.value}/{DEFAULT_VARIANTS[task]}\" to define a new one"
                    )
                specs[key] = apply_override(base, fields, where=f"{source}: [{task_name}.{variant}]")
        return SpecRegistry(specs.values())


def read_override_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"spec file {path} is not UTF-8 text (byte {exc.start}): is it a TOML file?") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec file {path} is not valid TOML: {exc}") from None


_SPEC_FIELDS = {"architecture", "labels", "output", "notes", "published_as"}
_PRE_FIELDS = {f.name for f in dataclasses.fields(Preprocess)}


def apply_override(spec: ModelSpec, fields: Mapping[str, Any], where: str) -> ModelSpec:
    """Return ``spec`` with ``fields`` applied and validated; what the user sets is no
    longer marked unconfirmed."""
    updates: dict[str, Any] = {}
    cleared: set[str] = set()
    for name, value in fields.items():
        if name == "preprocess":
            if not isinstance(value, Mapping):
                raise SpecError(f"{where}: preprocess must be a table")
            unknown = set(value) - _PRE_FIELDS
            if unknown:
                raise SpecError(f"{where}: unknown preprocess field(s) {sorted(unknown)}; known: {sorted(_PRE_FIELDS)}")
            pre = {k: _coerce_pre(k, v, where) for k, v in value.items()}
            updates["preprocess"] = dataclasses.replace(spec.preprocess, **pre)
            cleared |= {f"preprocess.{k}" for k in value}
        elif name == "hub":
            updates["hub"] = _coerce_hub(value, spec.hub, where)
            cleared |= {f"hub.{k}" for k in value}
            if updates["hub"] != spec.hub and "published_as" not in fields:  # the name follows the file
                updates["published_as"] = f"{updates['hub'].repo} ({updates['hub'].filename})"
        elif name in _SPEC_FIELDS:
            updates[name] = _coerce_spec(name, value, where)
            cleared.add(name)
        else:
            raise SpecError(f"{where}: unknown field '{name}'; known: {sorted(_SPEC_FIELDS | {'preprocess', 'hub', 'base'})}")
    updates["unconfirmed"] = frozenset(spec.unconfirmed - cleared)
    return dataclasses.replace(spec, **updates)


_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _coerce_hub(value: Any, current: HubSource | None, where: str) -> HubSource:
    """A ``hub`` table (``repo = "owner/name"``, ``filename = "model.onnx"``): where the
    published ONNX is, for a built-in variant whose path is unconfirmed or a new variant
    with its own published file. Both names become a cache path, so they are checked."""
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: hub must be a table with repo and filename")
    unknown = set(value) - {"repo", "filename"}
    if unknown:
        raise SpecError(f"{where}: unknown hub field(s) {sorted(unknown)}; known: ['filename', 'repo']")
    if current is None and set(value) != {"repo", "filename"}:
        raise SpecError(f"{where}: this variant has no published file yet; give the hub both repo and filename")
    repo = value.get("repo", current.repo if current else None)
    filename = value.get("filename", current.filename if current else None)
    if not isinstance(repo, str) or not _HUB_REPO.fullmatch(repo) or ".." in repo:
        raise SpecError(f"{where}: hub.repo must be a hub repository name such as \"owner/name\", got {repo!r}")
    parts = filename.split("/") if isinstance(filename, str) else []
    if not parts or any(p in ("", ".", "..") or "\\" in p or not p.isprintable() for p in parts):
        raise SpecError(f"{where}: hub.filename must be a file path inside the repository such as "
                        f"\"model.onnx\", got {filename!r}")
    return HubSource(repo, filename)


def _enum(cls, value, what):
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        raise SpecError(f"{what}: '{value}' is not one of {[m.value for m in cls]}") from None


def _coerce_spec(name: str, value: Any, where: str) -> Any:
    if name == "architecture":
        return _enum(Architecture, value, f"{where} architecture")
    if name == "output":
        return _enum(OutputKind, value, f"{where} output")
    if name == "labels":
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) and v for v in value):
            raise SpecError(f"{where}: labels must be a list of at least two non-empty strings")
        if len(set(value)) != len(value):
            raise SpecError(f"{where}: labels must be unique")
        return tuple(value)
    if not isinstance(value, str):
        raise SpecError(f"{where}: {name} must be a string")
    return value


def _coerce_pre(name: str, value: Any, where: str) -> Any:
    enums = {
        "resize": ResizeRule,
        "crop": CropPosition,
        "interpolation": Interpolation,
        "channel_order": ChannelOrder,
        "alpha": AlphaMode,
    }
    if name in enums:
        return _enum(enums[name], value, f"{where} preprocess.{name}")
    if name == "antialias":
        if not isinstance(value, bool):
            raise SpecError(f"{where}: preprocess.antialias must be true or false")
        return value
    if name == "size":
        if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 4096:
            raise SpecError(f"{where}: preprocess.size must be an integer between 8 and 4096")
        return value
    # mean / std
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise SpecError(f"{where}: preprocess.{name} must be a list of three numbers")
    if name == "std" and any(v <= 0 for v in value):
        raise SpecError(f"{where}: preprocess.std values must be positive")
    # (x - mean) / std is written as float32, or float16 on the GPU path (at most 65504):
    # a std near zero (or a value past that range) turns pixels into inf/NaN. Real stds
    # are ~0.2-0.5, means in [0, 1].
    if name == "std" and any(v < _MIN_STD for v in value):
        raise SpecError(f"{where}: preprocess.std values must be at least {_MIN_STD:g} (a std near zero "
                        f"makes pixels inf/NaN, in float16 below about 1.5e-5), got {list(value)}")
    if any(abs(v) > _MAX_NORM for v in value):
        raise SpecError(f"{where}: preprocess.{name} values must be at most {_MAX_NORM:g} in size "
                        f"(in the [0, 1] pixel unit), got {list(value)}")
    return tuple(float(v) for v in value)


_MIN_STD = 1e-4
_MAX_NORM = 1e6


def spec_as_dict(spec: ModelSpec) -> dict[str, Any]:
    """Plain-JSON view of a spec (used by ``engine models --json`` and ONNX metadata)."""

    def plain(v):
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, (tuple, list, frozenset, set)):
            return sorted(plain(x) for x in v) if isinstance(v, (frozenset, set)) else [plain(x) for x in v]
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return v

    out = plain(spec)
    out["key"] = spec.key
    return out


WORK_FIELDS = ("architecture", "labels", "output", "preprocess")


def spec_work_sha256(spec: ModelSpec) -> str:
    """Digest of what a spec decides about the work and its rows (architecture, labels,
    output kind, preprocessing), not of its notes, hub path or what is confirmed: the
    run record and the benchmark's model records name a spec by it."""
    import hashlib
    import json

    work = {k: v for k, v in spec_as_dict(spec).items() if k in WORK_FIELDS}
    return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()
