"""The PyTorch reference pipeline: the models as their cards use them.

Per image, each model's view is made the way its card does it
(:func:`engine.preprocess.reference.reference_view`: OpenCV for the gender model, PIL
and timm's eval transform for the quality model), so with both models every image is
decoded twice, once per card, as two card scripts run side by side would. Images are
loaded by a ``torch.utils.data.DataLoader`` with worker processes; the models are
eager ``torch.nn.Module`` s built by :func:`builders.export.build_torch_model` with
random weights (the published weights are not available here; this never claims to
be the published model).

Configurations: FP32 on the CPU; on CUDA, FP32, and FP16 autocast with channels_last
inputs and weights. Outputs are softmaxed in FP32 and copied back to the host, as a
script that prints labels would.

torch is imported inside the functions, never at module import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from benchmarks.config import Device, Precision
from engine.errors import DependencyError
from engine.preprocess.reference import REFERENCE_LIBRARY, Library, reference_view
from engine.specs import ModelSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REFERENCE_SEED = 0  # the seed engine.models exports random weights with: same weights both sides


def _torch():
    try:
        import torch
    except ImportError:
        raise DependencyError("torch", "torch", "The PyTorch reference benchmark") from None
    return torch


@dataclass(frozen=True)
class ReferenceConfig:
    device: Device
    precision: Precision  # FP32, or FP16 (autocast + channels_last; CUDA only)

    @property
    def config_id(self) -> str:
        return f"reference/torch/{self.device}/{self.precision.value}"

    @property
    def channels_last(self) -> bool:
        return self.precision is Precision.FP16

    def label(self) -> str:
        extra = ", autocast FP16, channels_last" if self.precision is Precision.FP16 else ", FP32"
        return f"PyTorch eager on {self.device}{extra} (card preprocessing, DataLoader workers)"


def reference_configs(device: Device) -> list[ReferenceConfig]:
    if device == "cuda":
        return [ReferenceConfig("cuda", Precision.FP32), ReferenceConfig("cuda", Precision.FP16)]
    return [ReferenceConfig("cpu", Precision.FP32)]


class ReferenceDataset:
    """Map-style dataset: index -> {"index", "ok", key: (3, S, S) float32 tensor per view}.

    A file that cannot be read or decoded yields ``ok = False`` and zero views, so one
    bad file in a user's folder does not end the benchmark (it is counted, not timed
    differently). Picklable, so DataLoader workers can be forked or spawned.
    """

    def __init__(self, paths: Sequence[Path], views: Sequence[tuple[str, ModelSpec, Library]]) -> None:
        self.paths = [str(p) for p in paths]
        self.views = [(key, spec.preprocess, library) for key, spec, library in views]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        from engine.preprocess.decode import ImageDecodeError

        out: dict[str, Any] = {"index": index, "ok": True}
        try:
            data = Path(self.paths[index]).read_bytes()
            for key, pre, library in self.views:
                out[key] = torch.from_numpy(reference_view(data, pre, library))
        except (OSError, ImageDecodeError) as exc:
            log.debug("reference: %s failed: %s", self.paths[index], exc)
            out = {"index": index, "ok": False}
            for key, pre, _ in self.views:
                out[key] = torch.zeros((3, pre.size, pre.size), dtype=torch.float32)
        return out


def card_views(specs: Sequence[ModelSpec]) -> list[tuple[str, ModelSpec, Library]]:
    return [(s.key, s, REFERENCE_LIBRARY[s.task]) for s in specs]


def build_reference_models(specs: Sequence[ModelSpec]) -> dict[str, "torch.nn.Module"]:
    """Eager models on the CPU with the same seeded random weights as the engine's
    random-weight exports (engine.models.RANDOM_SEED)."""
    from builders.export import build_random_model

    return {s.key: build_random_model(s.architecture, s.num_classes, REFERENCE_SEED) for s in specs}


class ReferencePipeline:
    """One reference configuration: models on the device, loaders per view set.

    ``models`` are CPU modules (shared between configurations); this object moves a copy
    to the device in the configuration's precision and memory format. Use as a context
    manager: DataLoader workers and device copies are released on exit.
    """

    def __init__(
        self,
        config: ReferenceConfig,
        models: Mapping[str, "torch.nn.Module"],
        specs: Sequence[ModelSpec],
        *,
        batch_size: int,
        workers: int,
        threads: int,
    ) -> None:
        torch = _torch()
        self.config = config
        self.specs = {s.key: s for s in specs}
        self.batch_size = batch_size
        self.workers = workers
        self.device = torch.device(config.device)
        if config.device == "cpu":
            torch.set_num_threads(threads)
        self.models: dict[str, torch.nn.Module] = {}
        for key, module in models.items():
            if key not in self.specs:
                continue
            m = module if config.device == "cpu" else _device_copy(module, self.device)
            if config.channels_last:
                m = m.to(memory_format=torch.channels_last)
            self.models[key] = m.eval()
        missing = set(self.specs) - set(self.models)
        if missing:
            raise ValueError(f"no reference model for {sorted(missing)}")
        self._loaders: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}  # (keys, paths) -> DataLoader

    def __enter__(self) -> "ReferencePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for loader in self._loaders.values():
            it = getattr(loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()  # persistent workers: stop them now, not at GC
        self._loaders.clear()
        if self.config.device != "cpu":
            self.models.clear()
            torch = _torch()
            torch.cuda.empty_cache()

    def loader(self, paths: Sequence[Path], keys: Sequence[str]):
        """A DataLoader over ``paths`` yielding the views ``keys`` (kept per paths and
        keys, with persistent workers)."""
        torch = _torch()
        ident = (tuple(keys), tuple(map(str, paths)))
        if ident not in self._loaders:
            dataset = ReferenceDataset(paths, card_views([self.specs[k] for k in keys]))
            kwargs: dict[str, Any] = {}
            if self.workers > 0:
                kwargs.update(persistent_workers=True, prefetch_factor=2)
            self._loaders[ident] = torch.utils.data.DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.workers,
                pin_memory=self.config.device == "cuda",
                **kwargs,
            )
        return self._loaders[ident]

    def iterate(self, paths: Sequence[Path], keys: Sequence[str], limit: int | None = None) -> Iterator[dict]:
        """The loader's batches, the first ``limit`` of them if given (a warm-up). With
        workers, the rest of that epoch is then drained unseen: a persistent-worker
        DataLoader finishes the batches it has handed out before a new epoch starts, so
        a warm-up that stopped early would push that decoding into the next, timed pass."""
        batches = iter(self.loader(paths, keys))
        if limit is None:
            yield from batches
            return
        for _, batch in zip(range(limit), batches):  # range first: no batch fetched past the limit
            yield batch
        if self.workers > 0:
            for _ in batches:
                pass

    def infer(self, key: str, x: "torch.Tensor") -> np.ndarray:
        """Probabilities (n, classes) for a host batch: copy in, forward, softmax, copy out."""
        torch = _torch()
        model = self.models[key]
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.config.precision is Precision.FP16:
                with torch.autocast(device_type=self.config.device, dtype=torch.float16):
                    logits = model(x)
            else:
                logits = model(x)
            probs = torch.softmax(logits.float(), dim=1)
            return probs.cpu().numpy()

    def synchronize(self) -> None:
        if self.config.device == "cuda":
            _torch().cuda.synchronize()


def _device_copy(module, device):
    import copy

    return copy.deepcopy(module).to(device)
