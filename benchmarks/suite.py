"""The benchmark suite: what ``engine bench`` runs.

Library entry point: ``run_bench(BenchConfig(...)) -> dict`` (the results document,
also written to ``<out_dir>/results.json`` with a plot and a Markdown summary). CLI
entry points: :func:`add_arguments` adds the options to an ``argparse`` parser and
:func:`main` runs with the parsed arguments; ``engine bench`` and
``python -m benchmarks run`` both use them.

What is measured, per configuration (reference: PyTorch as the cards use the models;
engine: DALI plus each available backend and precision), with warm-up batches first
and then ``repeats`` timed repetitions over the whole image set:

* ``preprocess``: file read, decode, resize/crop/normalise, per scenario (the views the
  scenario's models need), no model;
* ``inference``: one model on the preprocessed host batches (host in, host out);
* ``end_to_end``: files to probabilities, per scenario (gender, quality, both);
* ``engine_run``: ``engine run`` itself (parquet written, models loaded each time),
  where the measured backend is the one it drives.

Speedups are engine over reference medians from the same run on the same device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from benchmarks.backends import BACKENDS, BackendContext, find_backend
from benchmarks.config import BenchConfig, Pipeline, Precision, Scenario, Stage
from benchmarks.derive import compute_agreement, compute_headline, compute_speedups
from benchmarks.images import ImageSet, ImageSetSpec, folder_image_set, generate_image_set
from benchmarks.measure import MemorySampler, Throughput, device_used_bytes, sample_host_mb, time_repeated
from benchmarks.schema import SCHEMA_VERSION, validate_results
from engine import __version__
from engine.errors import DependencyError, EngineError, InputError
from engine.fileio import user_path, write_bytes_atomic
from engine.specs import ModelSpec, SpecRegistry, Task, spec_work_sha256

if TYPE_CHECKING:
    from benchmarks.engine_pipeline import EngineConfig, EnginePipeline
    from benchmarks.torch_reference import ReferenceConfig, ReferencePipeline
    from engine.models import ResolvedModel

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_PLOT = "results.png"
RESULTS_SUMMARY = "summary.md"
RANDOM_WEIGHTS_NOTE = (
    "All models run with RANDOM weights (the real architectures, seeded; the same weights on "
    "both sides): throughput is representative, predictions are meaningless and this is NOT "
    "the published model."
)


# ----------------------------------------------------------------------------- bookkeeping


def release_memory() -> None:
    """Collect garbage and, where torch has used CUDA, hand its cached blocks back to the
    driver: NVML's "used" (the device memory figure) counts torch's cache until
    ``empty_cache``, so one configuration's leftovers would count as the next one's peak."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class _Recorder:
    """Collects configurations, results and skipped items; times each stage."""

    def __init__(self, cfg: BenchConfig, device_memory: bool) -> None:
        self.cfg = cfg
        self.device_memory = device_memory
        # Device memory counts from before any model was loaded (None: sampled per stage).
        self.device_base = device_used_bytes() if device_memory else None
        self.configs: list[dict] = []
        self.results: list[dict] = []
        self.skipped: list[dict] = []
        self.outputs: dict[tuple[str, str], tuple[dict[str, np.ndarray], list[int]]] = {}
        self._open_host_mb = 0.0

    def opening(self, cid: str) -> None:
        """Note the host memory before a configuration opens: its stages report their peak
        above this level too (the configuration's own models, buffers and workers). What
        earlier configurations left is released first (see :func:`release_memory`)."""
        release_memory()
        self._open_host_mb = sample_host_mb()

    def add_config(self, cid: str, pipeline: Pipeline, backend: str, device: str, precision: Precision, label: str, details: dict) -> None:
        if any(c["id"] == cid for c in self.configs):  # a later round
            return
        self.configs.append(
            {
                "id": cid,
                "pipeline": pipeline.value,
                "backend": backend,
                "device": device,
                "precision": precision.value,
                "label": label,
                "details": details,
            }
        )

    def skip(self, cid: str, reason: str) -> None:
        log.warning("skipping %s: %s", cid, reason)
        self.skipped.append({"id": cid, "reason": reason})

    def is_skipped(self, cid: str) -> bool:
        return any(s["id"] == cid for s in self.skipped)

    def merge_rounds(self) -> None:
        """Pool the records of one figure from several rounds into one."""
        merged: dict[tuple, dict] = {}
        for r in self.results:
            key = (r["config"], r["stage"], r["scenario"], r["model"])
            if key not in merged:
                merged[key] = dict(r)
                continue
            m = merged[key]
            if r["images"] != m["images"]:
                raise RuntimeError(f"{key}: rounds processed {m['images']} and {r['images']} images")
            m.update(Throughput(m["images"], tuple(m["seconds"]) + tuple(r["seconds"])).as_dict())
            m["peak_host_mb"] = max(m["peak_host_mb"], r["peak_host_mb"])
            m["peak_host_delta_mb"] = max(m["peak_host_delta_mb"], r["peak_host_delta_mb"])
            if r["peak_device_mb"] is not None:
                m["peak_device_mb"] = max(m["peak_device_mb"] or 0.0, r["peak_device_mb"])
        self.results = list(merged.values())

    def stage(
        self,
        cid: str,
        stage: Stage,
        scenario: Scenario | None,
        model: str | None,
        run_once: Callable[[], int],
        warmup: Callable[[], object] | None,
        note: str | None = None,
    ) -> dict:
        what = f"{cid} {stage.value}" + (f" {scenario.value}" if scenario else "") + (f" {model}" if model else "")
        if warmup is not None and self.cfg.warmup_batches > 0:
            warmup()
        with MemorySampler(device=self.device_memory, device_base_bytes=self.device_base) as mem:
            tp: Throughput = time_repeated(run_once, self.cfg.repeats)
        if tp.images < 1:
            raise InputError(f"{what}: no image was processed")
        record = {
            "config": cid,
            "scenario": scenario.value if scenario else None,
            "stage": stage.value,
            "model": model,
            "images": tp.images,
            "batch_size": self.cfg.batch_size,
            **tp.as_dict(),
            "peak_host_mb": round(mem.peak_host_mb, 1),
            "peak_host_delta_mb": round(max(0.0, mem.peak_host_mb - self._open_host_mb), 1),
            "peak_device_mb": round(mem.peak_device_mb, 1) if mem.peak_device_mb is not None else None,
            "host_memory_metric": mem.metric,
            "note": note,
        }
        stats = record["images_per_s"]
        log.info("%s: %.2f images/s (median of %d, spread %.0f%%)", what, stats["median"], self.cfg.repeats, stats["spread_pct"])
        self.results.append(record)
        return record


# ----------------------------------------------------------------------------- the two sides


def _measure_reference(
    rec: _Recorder, pipe: "ReferencePipeline", paths: Sequence[Path], specs: Sequence[ModelSpec]
) -> None:
    cfg = rec.cfg
    cid = pipe.config.config_id
    w = cfg.warmup_batches
    inputs: dict[str, list] = {}

    for scenario in cfg.scenarios:
        keys = _keys(scenario, specs)
        collect = [k for k in keys if k not in inputs]
        for k in collect:
            inputs[k] = []
        first = {"pass": True}

        def pre_once(keys=keys, collect=collect, first=first) -> int:
            n = 0
            for batch in pipe.iterate(paths, keys):
                n += len(batch["index"])
                if first["pass"]:
                    good = batch["ok"].bool()  # undecodable files are not inference input (as in the engine)
                    for k in collect:
                        if bool(good.any()):
                            x = batch[k] if bool(good.all()) else batch[k][good]
                            if pipe.config.device == "cuda" and not x.is_pinned():
                                x = x.pin_memory()  # as the loader's batches: copied in asynchronously
                            inputs[k].append(x)
            first["pass"] = False
            return n

        rec.stage(cid, Stage.PREPROCESS, scenario, None, pre_once, lambda keys=keys: list(pipe.iterate(paths, keys, w)))

    for key in _keys_in_order(cfg, specs):
        batches = inputs[key]

        def inf_once(key=key, batches=batches) -> int:
            n = 0
            for x in batches:
                n += len(pipe.infer(key, x))
            pipe.synchronize()
            return n

        rec.stage(cid, Stage.INFERENCE, None, key, inf_once, lambda key=key, batches=batches: [pipe.infer(key, x) for x in batches[:w]])
    inputs.clear()

    for scenario in cfg.scenarios:
        keys = _keys(scenario, specs)
        last: dict = {}

        def e2e_once(keys=keys, last=last, limit=None) -> int:
            n = 0
            probs: dict[str, list] = {k: [] for k in keys}
            ok: list[int] = []
            for batch in pipe.iterate(paths, keys, limit):
                n += len(batch["index"])
                good = batch["ok"].numpy().astype(bool)
                ok.extend(int(i) for i in batch["index"].numpy()[good])
                for k in keys:
                    probs[k].append(pipe.infer(k, batch[k])[good])
            pipe.synchronize()
            last["outputs"] = ({k: np.concatenate(v) if v else np.zeros((0, 1)) for k, v in probs.items()}, ok)
            return n

        rec.stage(cid, Stage.END_TO_END, scenario, None, e2e_once, lambda e2e_once=e2e_once: e2e_once(limit=w))
        rec.outputs[(cid, scenario.value)] = last["outputs"]


def _measure_engine(
    rec: _Recorder,
    pipe: "EnginePipeline",
    image_set: ImageSet,
    specs: Sequence[ModelSpec],
    models: Mapping[str, "ResolvedModel"],
) -> None:
    from benchmarks.engine_pipeline import handled

    cfg = rec.cfg
    cid = pipe.config.config_id
    w = cfg.warmup_batches
    paths = image_set.paths
    inputs: dict[str, list[np.ndarray]] = {}

    for scenario in cfg.scenarios:
        keys = _keys(scenario, specs)
        collect = [k for k in keys if k not in inputs]
        for k in collect:
            inputs[k] = []
        first = {"pass": True}

        def pre_once(keys=keys, collect=collect, first=first) -> int:
            n = 0
            for result in pipe.preprocess(paths, keys):
                n += handled(result)
                if first["pass"]:
                    for k in collect:
                        inputs[k].append(result.views[k])
            first["pass"] = False
            return n

        pipe.preprocessor(keys)  # pipeline build is set-up, not preprocessing
        rec.stage(cid, Stage.PREPROCESS, scenario, None, pre_once, lambda keys=keys: list(pipe.preprocess(paths, keys, w)))

    for key in _keys_in_order(cfg, specs):
        batches = [b for b in inputs[key] if len(b)]

        def inf_once(key=key, batches=batches) -> int:
            return sum(len(pipe.infer(key, x)) for x in batches)

        rec.stage(cid, Stage.INFERENCE, None, key, inf_once, lambda key=key, batches=batches: [pipe.infer(key, x) for x in batches[:w]])
    inputs.clear()

    for scenario in cfg.scenarios:
        keys = _keys(scenario, specs)
        last: dict = {}

        def e2e_once(keys=keys, last=last) -> int:
            n, probs, ok = pipe.end_to_end(paths, keys)
            last["outputs"] = (probs, ok)
            return n

        rec.stage(cid, Stage.END_TO_END, scenario, None, e2e_once, lambda keys=keys: pipe.end_to_end(paths, keys, w))
        rec.outputs[(cid, scenario.value)] = last["outputs"]


def _measure_engine_run(
    rec: _Recorder,
    ec: "EngineConfig",
    image_set: ImageSet,
    specs: Sequence[ModelSpec],
    models: Mapping[str, "ResolvedModel"],
    context: BackendContext,
) -> None:
    """Time `engine run` itself: the product path, parquet included, forced onto the
    entry's device and backend (``--device cpu`` or ``--device gpu --gpu-backend``) at
    the entry's precision. TensorRT engines are the ones the entry's factory built (same
    cache folder); the PyTorch backend rebuilds the same seeded random weights."""
    from engine.models import ModelSource
    from engine.runner import ModelChoice, RunConfig, resolve_models, run

    cfg = rec.cfg
    cid = ec.config_id
    on_gpu = ec.entry.device == "cuda"
    torch_backend = ec.entry.run_backend == "torch"
    skip_id = f"{cid} engine_run"  # the rest of the configuration still runs
    if rec.is_skipped(skip_id):
        return  # said in the first round
    if image_set.source == "folder" and cfg.max_images is not None:
        rec.skip(skip_id, "`engine run` takes a whole folder; --max-images limits the benchmark set")
        return
    if image_set.excluded:
        rec.skip(skip_id, f"`engine run` takes the whole folder, and {len(image_set.excluded)} of its "
                 "files do not decode (left out of every other figure)")
        return
    scenarios = [Scenario.BOTH] if Scenario.BOTH in cfg.scenarios else list(cfg.scenarios)
    with tempfile.TemporaryDirectory(dir=cfg.out_dir, prefix="engine-run-") as tmp:
        work = Path(tmp)
        for scenario in scenarios:
            keys = _keys(scenario, specs)
            choices = tuple(
                ModelChoice(
                    models[k].spec.task,
                    models[k].spec.variant,
                    ModelSource(random_weights=True) if torch_backend else ModelSource(onnx=models[k].onnx_path),
                )
                for k in keys
            )
            out = work / f"{scenario.value}.parquet"

            config = RunConfig(
                input=image_set.root,
                out=out,
                models=choices,
                cache_dir=context.work_dir,
                spec_file=cfg.spec_file,
                batch_size=cfg.batch_size,
                threads=cfg.effective_threads,
                overwrite=True,
                progress=False,
                device="gpu" if on_gpu else "cpu",
                gpu_backend=ec.entry.run_backend or "tensorrt",
                precision=ec.precision.value,
            )

            def once(config=config) -> int:
                return run(config).images

            if torch_backend:  # random-weight models are exported into the cache once, before timing
                resolve_models(config)
            rec.stage(
                cid,
                Stage.ENGINE_RUN,
                scenario,
                None,
                once,
                None,
                note="whole `engine run` per repetition: model load, pipeline build and parquet writing included",
            )


def _keys(scenario: Scenario, specs: Sequence[ModelSpec]) -> list[str]:
    return [s.key for s in specs if s.task in scenario.tasks]


def _keys_in_order(cfg: BenchConfig, specs: Sequence[ModelSpec]) -> list[str]:
    return [s.key for s in specs if s.task in cfg.tasks]


# ----------------------------------------------------------------------------- the run


def resolve_device(choice: str) -> str:
    from benchmarks.machine import cuda_device_present

    present = cuda_device_present()
    if choice == "cuda" and not present:
        raise InputError("--device cuda: no CUDA device is visible on this machine")
    if choice == "auto":
        return "cuda" if present else "cpu"
    return choice


def prepare_images(cfg: BenchConfig) -> ImageSet:
    if cfg.images is not None:
        return folder_image_set(cfg.images, cfg.max_images)
    spec = ImageSetSpec(cfg.frames, cfg.crops, cfg.frame_size, cfg.seed)
    return generate_image_set(cfg.out_dir / "images", spec)


def _settings(cfg: BenchConfig, device: str) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (Scenario, Pipeline, Precision)):
            return v.value
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    out = {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    out.update(device=device, workers=cfg.effective_workers, threads=cfg.effective_threads)
    return out


def _model_record(spec: ModelSpec, resolved: "ResolvedModel | None") -> dict:
    return {
        "key": spec.key,
        "task": spec.task.value,
        "variant": spec.variant,
        "architecture": spec.architecture.value,
        "input_size": spec.preprocess.size,
        "labels": list(spec.labels),
        "weights": resolved.weights.value if resolved else "random",
        "weights_detail": resolved.weights_detail if resolved else "random weights, seed 0 - NOT the published model",
        "onnx": str(resolved.onnx_path) if resolved else None,
        "spec_sha256": spec_work_sha256(spec),  # what a spec file can change about the work
    }


def _engine_configs(cfg: BenchConfig, device: str, rec: _Recorder) -> list["EngineConfig"]:
    """The engine configurations to measure. A backend named with ``--backend`` that
    cannot run here (another device, none of the asked precisions, not installed) is
    recorded as skipped with the reason; of the default set, only those of this device
    that are not installed are (a CPU run does not list every GPU backend)."""
    from benchmarks.engine_pipeline import EngineConfig

    out = []
    for entry in BACKENDS:
        named = entry.name in cfg.backends
        if cfg.backends and not named:
            continue
        if entry.device != device:
            if named:
                rec.skip(f"engine/{entry.name}/{entry.device}", f"runs on {entry.device}; this run is on {device}")
            continue
        wanted = [p for p in entry.precisions if not cfg.precisions or p in cfg.precisions]
        if not wanted:
            if named:
                offered = ", ".join(p.value for p in entry.precisions)
                rec.skip(f"engine/{entry.name}/{entry.device}", f"offers {offered} on {device}, not the precision asked")
            continue
        reason = entry.unavailable_reason()
        for precision in wanted:
            cid = entry.config_id(precision)
            if reason is not None:
                rec.skip(cid, reason)
                continue
            out.append(EngineConfig(entry, precision))
    if not out and not rec.skipped:
        asked = ", ".join(p.value for p in cfg.precisions) or "any precision"
        rec.skip(f"engine/*/{device}", f"no engine backend on {device} offers {asked}")
    return out


def run_bench(
    config: BenchConfig,
    *,
    models: Mapping[str, "ResolvedModel"] | None = None,
    torch_models: Mapping[str, Any] | None = None,
) -> dict:
    """Run the suite; write ``results.json``, ``results.png`` (with matplotlib) and
    ``summary.md`` under ``config.out_dir``; return the results document.

    ``models`` (ResolvedModel by spec key) and ``torch_models`` (eager CPU modules by spec
    key) let a caller reuse models it already has (the tests do); by default the engine
    exports random-weight ONNX into the cache and the reference builds the same
    architectures with the same seed.
    """
    # Every repetition of `engine run` resolves its models again; the random-weights
    # warning is said once (the summary and the JSON notes say it too).
    with _each_message_once(logging.getLogger("engine.models")):
        return _run_bench(config, models=models, torch_models=torch_models)


class _each_message_once(logging.Filter):
    """Context manager: while it is open, ``logger`` passes each distinct message once
    (for the whole process: other threads' messages on that logger too)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger
        self._seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def __enter__(self) -> "_each_message_once":
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeFilter(self)


def _run_bench(
    config: BenchConfig,
    *,
    models: Mapping[str, "ResolvedModel"] | None,
    torch_models: Mapping[str, Any] | None,
) -> dict:
    from benchmarks.machine import git_commit, machine_info, package_versions
    from builders.calibration import CalibrationImages

    started = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    machine = machine_info()  # before the work: its load average tells how busy the machine was
    cfg = config
    for name in cfg.backends:
        find_backend(name)  # an unknown name is a user error, before any work
    try:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (cfg.out_dir, *cfg.out_dir.parents) if p.exists() and not p.is_dir()), cfg.out_dir)
        raise InputError(f"--out {cfg.out_dir}: {blocker} is a file; the suite writes a folder "
                         f"(results.json, plot, summary)") from None
    except OSError as exc:
        raise InputError(f"cannot make the output folder {cfg.out_dir}: {exc.strerror or exc}") from None
    device = resolve_device(cfg.device)
    registry = SpecRegistry.load(cfg.spec_file)
    variants = {Task.GENDER: cfg.gender_variant, Task.QUALITY: cfg.quality_variant}
    for task, variant in variants.items():  # a variant named for a model no scenario runs is still checked
        if variant is not None:
            registry.get(task, variant)
    specs = [registry.get(t, variants[t]) for t in cfg.tasks]
    image_set = prepare_images(cfg)
    log.info("benchmark on %s: %d images (%s), %s", device, len(image_set), image_set.source, ", ".join(s.key for s in specs))

    rec = _Recorder(cfg, device_memory=device == "cuda")
    notes = [RANDOM_WEIGHTS_NOTE]
    resolved: dict[str, ResolvedModel] = {}

    # One unit per configuration: opens it, measures every stage, closes it. With several
    # rounds the units run again in alternating order (A B, B A, ...), so slow drifts of a
    # shared machine's load fall on both sides alike; timings of all rounds are pooled.
    units: list[tuple[str, Callable[[], None]]] = []
    engine_configs = _engine_configs(cfg, device, rec) if Pipeline.ENGINE in cfg.pipelines else []
    if engine_configs:  # models are exported only when an engine configuration will run
        resolved = _resolve_engine_models(cfg, specs, models)
        context = BackendContext(
            threads=cfg.effective_threads,
            batch_size=cfg.batch_size,
            work_dir=(cfg.cache_dir or cfg.out_dir / "cache"),
            calibration_images=CalibrationImages(image_set.paths[:32]),  # hashed once for every prepare()
        )
        for ec in engine_configs:
            units.append((ec.config_id, functools.partial(_run_engine_config, rec, ec, resolved, context, image_set, specs)))
    if Pipeline.REFERENCE in cfg.pipelines:
        units += _reference_units(rec, cfg, device, specs, image_set.paths, torch_models)
    for round_index in range(cfg.rounds):
        for cid, unit in units if round_index % 2 == 0 else units[::-1]:
            if rec.is_skipped(cid):
                continue
            if cfg.rounds > 1:
                log.info("round %d of %d: %s", round_index + 1, cfg.rounds, cid)
            unit()
    rec.merge_rounds()
    if not rec.results:
        why = "; ".join(f"{s['id']}: {s['reason']}" for s in rec.skipped) or "no configuration selected"
        raise InputError(f"nothing was measured ({why})")

    configs = rec.configs
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suite": {"name": "anime-batch-engine benchmark", "engine_version": __version__, "git_commit": git_commit()},
        "created_utc": created,
        "duration_s": 0.0,
        "machine": machine,
        "packages": package_versions(),
        "settings": _settings(cfg, device),
        "images": image_set.describe(),
        "models": [_model_record(s, resolved.get(s.key)) for s in specs],
        "configs": configs,
        "skipped": rec.skipped,
        "results": rec.results,
        "speedups": compute_speedups(configs, rec.results),
        "agreement": compute_agreement(configs, rec.outputs),
        "headline": compute_headline(configs, rec.results),
        "notes": notes,
        "outputs": {
            "json": str(cfg.out_dir / RESULTS_JSON),
            "plot": None,
            "plot_skipped": None,
            "summary": str(cfg.out_dir / RESULTS_SUMMARY),
        },
    }
    if image_set.excluded:
        notes.append(f"{len(image_set.excluded)} file(s) of the image folder do not decode and were left out "
                     "(see images.excluded): every figure is over the images that decode.")
    if device == "cpu":
        notes.append("CPU run: no GPU figures; FP16/INT8 and the GPU backends were not measured.")
    load = machine["load_average"]
    if load and load[0] > machine["usable_cpus"]:
        notes.append(
            f"The machine was busy when the run started (load {load[0]:.1f} on {machine['usable_cpus']} cores): "
            "figures were taken under contention; compare ratios from the same run rather than absolute figures."
        )
    if cfg.plot:
        from benchmarks.plot import plot_results

        try:
            plot_results(doc, cfg.out_dir / RESULTS_PLOT)
            doc["outputs"]["plot"] = str(cfg.out_dir / RESULTS_PLOT)
        except DependencyError as exc:
            doc["outputs"]["plot_skipped"] = str(exc)
            log.warning("no plot: %s", exc)
    else:
        doc["outputs"]["plot_skipped"] = "disabled (--no-plot)"
    if not doc["outputs"].get("plot"):
        (cfg.out_dir / RESULTS_PLOT).unlink(missing_ok=True)  # an earlier run's plot would pass for this one's
    doc["duration_s"] = round(time.perf_counter() - started, 3)
    validate_results(doc)
    write_json(doc, cfg.out_dir / RESULTS_JSON)
    from benchmarks.report import markdown_summary

    write_bytes_atomic(cfg.out_dir / RESULTS_SUMMARY, markdown_summary(doc).encode("utf-8"))
    log.info("benchmark finished in %.1f s; results in %s", doc["duration_s"], cfg.out_dir)
    return doc


def _resolve_engine_models(
    cfg: BenchConfig, specs: Sequence[ModelSpec], given: Mapping[str, "ResolvedModel"] | None
) -> dict[str, "ResolvedModel"]:
    from engine.models import ModelSource, default_cache_dir, resolve_model

    out = {}
    for spec in specs:
        if given is not None and spec.key in given:
            out[spec.key] = given[spec.key]
        else:
            out[spec.key] = resolve_model(spec, ModelSource(random_weights=True), cfg.cache_dir or default_cache_dir())
    return out


def _run_engine_config(
    rec: _Recorder,
    ec: "EngineConfig",
    resolved: Mapping[str, "ResolvedModel"],
    context: BackendContext,
    image_set: ImageSet,
    specs: Sequence[ModelSpec],
) -> None:
    from benchmarks.engine_pipeline import open_pipeline

    cid = ec.config_id
    log.info("engine configuration %s: setting up", cid)
    rec.opening(cid)
    try:
        pipe = open_pipeline(ec, resolved, context)
    except EngineError as exc:  # e.g. a precision the graph cannot be prepared for
        rec.skip(cid, str(exc))
        return
    with pipe:
        details = {
            "threads": context.threads,
            "preprocess_device": ec.entry.preprocess_device,
            "executor": ec.entry.executor,
            "backend_details": {k: getattr(b, "providers", None) and list(b.providers) for k, b in pipe.backends.items()},
        }
        rec.add_config(cid, Pipeline.ENGINE, ec.entry.name, ec.device, ec.precision, ec.label(), details)
        _measure_engine(rec, pipe, image_set, specs, resolved)
    del pipe  # its models and buffers, before the memory is released
    if rec.cfg.engine_run_check and ec.entry.runner:
        rec.opening(cid)  # `engine run` opens its own models: the benchmark's are gone by now
        _measure_engine_run(rec, ec, image_set, specs, resolved, context)


def _reference_units(
    rec: _Recorder,
    cfg: BenchConfig,
    device: str,
    specs: Sequence[ModelSpec],
    paths: Sequence[Path],
    torch_models: Mapping[str, Any] | None,
) -> list[tuple[str, Callable[[], None]]]:
    from benchmarks.torch_reference import reference_configs

    selected = [rc for rc in reference_configs(device) if not cfg.precisions or rc.precision in cfg.precisions]
    if not selected:
        rec.skip(f"reference/torch/{device}", "no selected precision is a reference precision on this device")
        return []
    given = dict(torch_models or {})
    return [(rc.config_id, functools.partial(_run_reference_config, rec, cfg, rc, given, specs, paths)) for rc in selected]


def _run_reference_config(
    rec: _Recorder,
    cfg: BenchConfig,
    rc: "ReferenceConfig",
    given: Mapping[str, Any],
    specs: Sequence[ModelSpec],
    paths: Sequence[Path],
) -> None:
    """Open one reference configuration, measure it, close it. Models not given by the
    caller are built here and dropped after, so their memory is this configuration's."""
    from benchmarks.torch_reference import ReferencePipeline, build_reference_models, card_views

    log.info("reference configuration %s: setting up", rc.config_id)
    rec.opening(rc.config_id)
    modules = dict(given)
    missing = [s for s in specs if s.key not in modules]
    if missing:
        log.info("building reference models: %s", ", ".join(s.key for s in missing))
        modules.update(build_reference_models(missing))
    with ReferencePipeline(
        rc, modules, specs, batch_size=cfg.batch_size, workers=cfg.effective_workers, threads=cfg.effective_threads
    ) as pipe:
        details = {
            "workers": cfg.effective_workers,
            "threads": cfg.effective_threads,
            "channels_last": rc.channels_last,
            "libraries": {key: lib for key, _, lib in card_views(specs)},
            "torch_math": _torch_math(),
        }
        rec.add_config(rc.config_id, Pipeline.REFERENCE, "torch", rc.device, rc.precision, rc.label(), details)
        _measure_reference(rec, pipe, paths, specs)
    del modules
    gc.collect()


def _torch_math() -> dict[str, bool]:
    """The reference's math settings, torch's defaults left as they are (recorded: they
    decide whether "FP32" convolutions and matmuls use TF32 on a GPU)."""
    import torch

    return {
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


def write_json(doc: dict, path: Path) -> None:
    write_bytes_atomic(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))


def load_results(path: Path) -> dict:
    """Read and validate a results file (user errors as :class:`InputError`)."""
    from benchmarks.schema import SchemaError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read benchmark results {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"benchmark results {path} are not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"benchmark results {path} are not UTF-8 text (byte {exc.start}): not a results file") from None
    try:
        validate_results(doc)
    except SchemaError as exc:
        raise InputError(f"{path}: {exc}") from None
    return doc


# ----------------------------------------------------------------------------- CLI


def _frame_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def add_arguments(parser: argparse.ArgumentParser, *, include_common: bool = True) -> None:
    """Add the suite's options to ``parser``. With ``include_common=False`` the caller
    provides ``--cache-dir`` and ``--spec-file`` itself (as the engine CLI does)."""
    g = parser.add_argument_group("images")
    g.add_argument("--images", type=user_path, help="benchmark on this folder of images instead of a generated set")
    g.add_argument("--max-images", type=int, help="use at most this many images of --images")
    # None = not given: the generated set's defaults, and a clear error when given with --images
    g.add_argument("--frames", type=int, help="generated 16:9 frames (default 32)")
    g.add_argument("--crops", type=int, help="generated small head crops (default 32)")
    g.add_argument("--frame-size", type=_frame_size, metavar="WxH", help="generated frame size (default 1920x1080)")
    g.add_argument("--seed", type=int, help="seed of the generated set (default 0)")
    g = parser.add_argument_group("what to measure")
    g.add_argument("--scenario", action="append", choices=[s.value for s in Scenario], help="gender, quality or both (repeatable; default all three)")
    g.add_argument("--pipeline", action="append", choices=[p.value for p in Pipeline], help="reference or engine (repeatable; default both)")
    g.add_argument("--backend", action="append", choices=[e.name for e in BACKENDS], help="engine backend (repeatable; default every one available)")
    g.add_argument("--precision", action="append", choices=[p.value for p in Precision], help="precision (repeatable; default every one available)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA where a GPU is visible, else CPU")
    g.add_argument("--gender-variant", help="gender spec variant (default: the task's default)")
    g.add_argument("--quality-variant", help="quality spec variant (default: the task's default)")
    g.add_argument("--no-engine-run", action="store_true", help="do not time `engine run` itself")
    g = parser.add_argument_group("how")
    g.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    g.add_argument("--repeats", type=int, default=3, help="timed repetitions per figure and round (default 3)")
    g.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration this many times, in alternating order, and pool the timings "
        "(default 1; 2 or more on a shared machine)",
    )
    g.add_argument("--warmup-batches", type=int, default=2, help="untimed batches before each figure (default 2)")
    g.add_argument("--workers", type=int, help="DataLoader workers of the reference (default: one per core, at most 16)")
    g.add_argument("--threads", type=int, help="intra-op and decode threads (default: all cores)")
    g.add_argument("--out", type=_out_folder, default=Path("bench-results"), help="output folder (default bench-results)")
    g.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    if include_common:
        parser.add_argument("--cache-dir", type=user_path, help="where exported models are kept")
        parser.add_argument("--spec-file", type=user_path, help="TOML file overriding model specs")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    generator = {"frames": args.frames, "crops": args.crops, "frame_size": args.frame_size, "seed": args.seed}
    if args.images is not None and any(v is not None for v in generator.values()):
        given = ", ".join(f"--{k.replace('_', '-')}" for k, v in generator.items() if v is not None)
        raise InputError(f"{given} shape(s) the generated image set; --images benchmarks your folder instead")
    defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig) if f.name in generator}
    generator = {k: defaults[k] if v is None else v for k, v in generator.items()}
    return BenchConfig(
        out_dir=args.out,
        images=args.images,
        max_images=args.max_images,
        frames=generator["frames"],
        crops=generator["crops"],
        frame_size=tuple(generator["frame_size"]),
        seed=generator["seed"],
        scenarios=tuple(Scenario(s) for s in _unique(args.scenario)) or tuple(Scenario),
        pipelines=tuple(Pipeline(p) for p in _unique(args.pipeline)) or tuple(Pipeline),
        backends=tuple(_unique(args.backend)),
        precisions=tuple(Precision(p) for p in _unique(args.precision)),
        device=args.device,
        gender_variant=args.gender_variant,
        quality_variant=args.quality_variant,
        batch_size=args.batch_size,
        repeats=args.repeats,
        rounds=args.rounds,
        warmup_batches=args.warmup_batches,
        workers=args.workers,
        threads=args.threads,
        cache_dir=getattr(args, "cache_dir", None),
        spec_file=getattr(args, "spec_file", None),
        engine_run_check=not args.no_engine_run,
        plot=not args.no_plot,
    )


def _out_folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder (an empty name would write into the current one)")
    return user_path(text)


def _unique(values: Iterable[str] | None) -> list[str]:
    return list(dict.fromkeys(values or []))


def main(args: argparse.Namespace) -> int:
    """Run the suite from parsed arguments and print the headline; 0 on success.
    User errors propagate as :class:`engine.errors.EngineError` for the CLI to print;
    Ctrl-C (or SIGTERM, SIGHUP) ends it with one line and 128 + the signal."""
    from engine.signals import interrupted_status, sigterm_as_interrupt

    cfg = config_from_args(args)
    try:
        with sigterm_as_interrupt():
            doc = run_bench(cfg)
    except KeyboardInterrupt as exc:
        earlier = " (the one there is from an earlier run)" if (cfg.out_dir / RESULTS_JSON).is_file() else ""
        print(f"benchmark interrupted: this run wrote no {cfg.out_dir / RESULTS_JSON}{earlier}", file=sys.stderr)
        return interrupted_status(exc)
    from benchmarks.report import headline_lines

    for line in headline_lines(doc):
        print(line)
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m benchmarks run` is the entry point
    sys.exit("use: python -m benchmarks run [options]")
