"""Build the real architectures in PyTorch, load checkpoints, export to ONNX.

The published weights cannot always be fetched, so the project rebuilds the same
networks (torchvision ResNet, timm CAFormer-S36), loads a user's checkpoint into them
or gives them seeded random weights, and exports ONNX files that record in their
metadata exactly which weights they hold. A random-weight export is never passed off
as the published model: its metadata says so and the run path reports it.

Exporter: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
At torch 2.14 on the CPU it exports both resnet and caformer_s36 with a dynamic batch
from a batch-1 example, honours the requested opset (17), writes one self-contained
file, and is 2-4x faster than the torch.export-based exporter, which cannot go below
opset 18 (its down-conversion fails) and needs an example batch of at least 2 to keep
the batch dimension symbolic. torch, torchvision and timm are imported lazily.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from builders.onnx_io import inspect_onnx, write_model_atomic
from engine.errors import DependencyError, ModelError
from engine.specs import Architecture, ModelSpec, OutputKind

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
DEFAULT_OPSET = 17
# Opsets an export may ask for: 13 is the oldest the rest of the project takes (per-channel
# Q/DQ for INT8, the FP16 pass, TensorRT's parser); 20 the newest the TorchScript
# exporter writes (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET at torch 2.x).
MIN_OPSET, MAX_OPSET = 13, 20
CHECKPOINT_SUFFIXES_TORCH = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors",) + CHECKPOINT_SUFFIXES_TORCH

# Metadata keys written into every exported file.
META_TASK = "engine.task"
META_VARIANT = "engine.variant"
META_ARCHITECTURE = "engine.architecture"
META_WEIGHTS = "engine.weights"
META_WEIGHTS_DETAIL = "engine.weights_detail"
META_OUTPUT_KIND = "engine.output_kind"
META_LABELS = "engine.labels"
META_TORCH_VERSION = "engine.torch_version"

WEIGHTS_RANDOM = "random"
WEIGHTS_CHECKPOINT = "checkpoint"


def _torch():
    try:
        import torch
    except ImportError:
        raise DependencyError("torch", "torch", "Exporting models") from None
    return torch


def random_weights_detail(seed: int) -> str:
    return f"random weights, seed {seed} - NOT the published model"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_torch_model(architecture: Architecture, num_classes: int):
    """The architecture with a ``num_classes`` head, initialised by the library's own
    init (uses the global torch RNG), in eval mode."""
    _torch()
    architecture = Architecture(architecture)
    if num_classes < 1:
        raise ModelError(f"{architecture.value}: num_classes must be positive, got {num_classes}")
    try:
        if architecture is Architecture.CAFORMER_S36:
            import timm

            model = timm.create_model("caformer_s36", pretrained=False, num_classes=num_classes)
        else:
            import torchvision.models

            factory = getattr(torchvision.models, architecture.value)
            model = factory(weights=None, num_classes=num_classes)
    except ImportError as exc:
        package = "timm" if architecture is Architecture.CAFORMER_S36 else "torchvision"
        logger.debug("import failed: %s", exc)
        raise DependencyError(package, "torch", "Exporting models") from None
    return model.eval()


def build_random_model(architecture: Architecture, num_classes: int, seed: int):
    """``build_torch_model`` with weights drawn from ``seed``; the global RNG state of
    the caller is left as it was. Same seed and torch version, same weights."""
    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_torch_model(architecture, num_classes)


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    torch = _torch()
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise DependencyError("safetensors", "torch", "Loading .safetensors checkpoints") from None
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    if suffix in CHECKPOINT_SUFFIXES_TORCH:
        import pickle
        import struct

        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        # What torch's (weights-only) unpickler raises on a file that is not a checkpoint:
        # a text file gives KeyError (a memo lookup), other bytes IndexError, struct.error,
        # TypeError or AssertionError from its opcode handling. The try holds only the load.
        except (
            pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError,
            KeyError, IndexError, TypeError, AssertionError, struct.error,
        ) as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its message
            first = text.splitlines()[0] if text else type(exc).__name__
            if isinstance(exc, (KeyError, IndexError, TypeError, AssertionError, struct.error)):
                first = f"not a checkpoint or corrupt ({type(exc).__name__} {first[:80]} in torch's unpickler)"
            if "unsupported global" in text.lower():  # a class the weights-only unpickler refuses
                raise ModelError(
                    f"checkpoint {path} holds more than plain tensors (a pickled module or object?) and is not "
                    f"loaded (weights_only); save its state_dict() instead"
                ) from None
            raise ModelError(f"checkpoint {path} is not a readable PyTorch file: {first[:200]}") from None
    raise ModelError(f"checkpoint {path}: unknown format '{suffix}' (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    torch = _torch()
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}, ...
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise ModelError(f"checkpoint {path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(f"checkpoint {path} holds no tensors")
    dropped = len(obj) - len(tensors)
    if dropped:
        logger.debug("checkpoint %s: ignoring %d non-tensor entries", path, dropped)
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
                changed = True
    return tensors


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _checkpoint_file(path: Path) -> Path:
    """``path`` as a Path, once it names a file (a one-line :class:`ModelError` if not)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"checkpoint {path} is a folder: name the checkpoint file")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(model, path: Path, *, architecture: str | None = None):
    """Load the state dict at ``path`` (safetensors or a PyTorch state dict) into
    ``model``, strictly. Returns the model. A checkpoint that does not fit raises a
    one-line :class:`ModelError` naming a few missing/unexpected/mismatched keys."""
    path = _checkpoint_file(path)
    state = _unwrap_state_dict(_read_state_dict(path), path)
    expected = model.state_dict()
    # Keys in model order (or checkpoint order): the first ones shown are the telling ones.
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        what = architecture or type(model).__name__
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:3])}")
        raise ModelError(f"checkpoint {path} does not fit {what}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {path} does not fit {architecture or type(model).__name__}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _torchscript_export(torch, module, dummy, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            module,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def export_onnx(
    spec: ModelSpec,
    out_path: Path,
    *,
    checkpoint: Path | None = None,
    random_seed: int | None = None,
    opset: int = DEFAULT_OPSET,
    probabilities: bool = False,
) -> Path:
    """Export ``spec``'s architecture to ``out_path`` with either a checkpoint's weights
    or seeded random weights (exactly one). Input ``input`` (N, 3, S, S) float32 with a
    dynamic batch, output ``output`` (N, classes): logits, or probabilities when
    ``probabilities`` appends a softmax. The file is written atomically and carries
    ``engine.*`` metadata saying what it holds."""
    if (checkpoint is None) == (random_seed is None):
        raise ModelError("export needs exactly one source of weights: a checkpoint or a random seed")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"opset must be {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    out_path = Path(out_path)
    # before the export (a minute for caformer): where the file goes
    if out_path.is_symlink():  # written through: the link stays, its target is replaced
        out_path = Path(os.path.realpath(out_path))
    if out_path.is_dir():
        raise ModelError(f"{out_path} is a folder: name the ONNX file to write")
    if out_path.exists() and not out_path.is_file():  # a device or FIFO: the rename would replace it
        raise ModelError(f"{out_path} is not a regular file: name the ONNX file to write")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot make the folder of {out_path}: {exc.strerror or exc}") from None
    if not os.access(out_path.parent, os.W_OK):
        raise ModelError(f"the folder of {out_path} is not writable")
    torch = _torch()
    import onnx

    started = time.perf_counter()
    if checkpoint is not None:
        checkpoint = _checkpoint_file(checkpoint)
        weights, detail = WEIGHTS_CHECKPOINT, f"checkpoint sha256:{file_sha256(checkpoint)}"
        model = build_torch_model(spec.architecture, spec.num_classes)
        load_checkpoint(model, checkpoint, architecture=f"{spec.architecture.value} ({spec.num_classes} classes)")
    else:
        weights, detail = WEIGHTS_RANDOM, random_weights_detail(int(random_seed))
        model = build_random_model(spec.architecture, spec.num_classes, int(random_seed))
    logger.info("exporting %s (%s, %s) to %s ...", spec.key, spec.architecture.value, detail, out_path)

    module = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)) if probabilities else model
    module.eval()
    size = spec.preprocess.size
    dummy = torch.zeros(1, 3, size, size, dtype=torch.float32)
    with torch.no_grad():
        data = _torchscript_export(torch, module, dummy, opset)

    proto = onnx.load_from_string(data)
    output_kind = OutputKind.PROBABILITIES if probabilities else OutputKind.LOGITS
    metadata = {
        META_TASK: spec.task.value,
        META_VARIANT: spec.variant,
        META_ARCHITECTURE: spec.architecture.value,
        META_WEIGHTS: weights,
        META_WEIGHTS_DETAIL: detail,
        META_OUTPUT_KIND: output_kind.value,
        META_LABELS: json.dumps(list(spec.labels)),
        META_TORCH_VERSION: str(torch.__version__),
    }
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    try:
        write_model_atomic(proto, out_path)
    except OSError as exc:
        raise ModelError(f"cannot write {out_path}: {exc.strerror or exc}") from None

    info = inspect_onnx(out_path)
    if info.input.fixed_batch is not None:  # a regression in the exporter, not a user error
        raise RuntimeError(f"export of {spec.key} produced a fixed batch {info.input.shape}")
    logger.info("exported %s to %s in %.1f s", spec.key, out_path, time.perf_counter() - started)
    return out_path
