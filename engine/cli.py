"""Command line: parses arguments and calls the library, nothing more.

Every user error (:class:`engine.errors.EngineError`) is printed as one line
``engine: error: ...`` with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

from engine import __version__
from engine.errors import EngineError, no_room_message
from engine.fileio import user_path
from engine.signals import interrupted_status, sigterm_as_interrupt
from engine.specs import DEFAULT_VARIANTS, SpecRegistry, Task, spec_as_dict

log = logging.getLogger("engine")

EPILOG = """\
examples:
  engine models                                   list the model specs and their unconfirmed points
  engine run /data/frames --out results.parquet   classify every image (published models; GPU if ready)
  engine run /data/frames --device gpu            insist on the GPU path (says what is missing otherwise)
  engine run examples/images --random-weights     smoke run with random-weight models (labels meaningless)
  engine build --precision fp16 --calib /data/frames   prepare FP16 graphs, check them, build TensorRT engines
  engine run /data/crops --quality-variant head_crop --gender-onnx my_gender.onnx
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec-file", type=user_path, help="TOML file overriding or adding model specs: [task.variant] tables, "
                   "the fields `engine models --json` prints (README: Model specs)")
    p.add_argument(
        "--cache-dir",
        type=user_path,
        help="where exported/downloaded models are kept (default: $ENGINE_CACHE_DIR or ~/.cache/anime-batch-engine)",
    )


def _add_model_sources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "models",
        "Where each model comes from. Default: the published ONNX (downloaded once when online, "
        "then cached). A user ONNX or a PyTorch checkpoint (safetensors or state dict) may be given "
        "instead. --random-weights exports the real architectures with random weights, for smoke runs "
        "only: every output then says so.",
    )
    for task in Task:
        t = task.value
        g.add_argument(f"--{t}-variant", help=f"{t} variant (default {DEFAULT_VARIANTS[task]}; see `engine models`)")
        g.add_argument(f"--{t}-onnx", type=user_path, metavar="FILE", help=f"use this ONNX file for the {t} model")
        g.add_argument(
            f"--{t}-checkpoint", type=user_path, metavar="FILE", help=f"export the {t} model from this checkpoint"
        )
    g.add_argument(
        "--only", choices=[t.value for t in Task], help="run one model only (default: both)"
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="use random-weight models where no ONNX/checkpoint is given (smoke runs; results are meaningless)",
    )
    g.add_argument("--no-download", action="store_true", help="never try to download the published models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="Batch engine for two anime-frame classifiers: character gender (ResNet, 224x224) "
        "and face quality (CAFormer-S36, 384x384). Results go to one parquet file, one row per image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "models",
        help="list the model specs",
        description="List every model spec in force (built-in, plus --spec-file overrides): size, "
        "preprocessing, labels, output kind, and which facts the public model cards do not confirm.",
    )
    p.add_argument("--json", action="store_true", help="print the specs as JSON")
    _add_common(p)

    p = sub.add_parser(
        "run",
        help="classify every image in a folder and write parquet",
        description="Classify every image under INPUT (recursively; PNG, JPEG, WebP, BMP, GIF, TIFF) with both "
        "models and write one row per image to a parquet file. Files that cannot be decoded become rows "
        "with an error and the run goes on. Results are written in parts as the run goes: rerunning the "
        "same command resumes where it stopped.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=user_path, help="folder of images (searched recursively) or one image file")
    p.add_argument("--out", type=user_path, default=Path("results.parquet"), help="output parquet (default results.parquet)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--threads", type=int, help="CPU threads for decoding and inference (default: all cores)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="auto (default): the GPU path when a GPU, the GPU packages and the engines are all here, else "
        "the CPU path; the path taken and why are printed first. gpu: refuse to start without them "
        "(naming what is missing, and the `engine build` command for a missing engine). cpu: never use a GPU",
    )
    p.add_argument(
        "--gpu-backend",
        default="tensorrt",
        choices=["tensorrt", "torch"],
        help="what runs the models on the GPU path: tensorrt (default; engines from `engine build`) or torch "
        "(PyTorch on CUDA, fp32/fp16 autocast; needs --<model>-checkpoint or --random-weights)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=["fp32", "fp16", "int8"],
        help="inference precision (default: fp16 on the GPU path, fp32 on the CPU path). On the CPU, "
        "fp16/int8 run the prepared ONNX graphs (see `engine build`): useful to check them, but fp32 is "
        "the fastest there. On the GPU it selects which TensorRT engines are used",
    )
    p.add_argument("--calib", type=user_path, metavar="DIR", help="calibration images for --precision int8")
    p.add_argument("--calib-count", type=int, metavar="N",
                   help="images taken from --calib (default 64, as `engine build`: the same count reuses its graph)")
    p.add_argument("--overwrite", action="store_true", help="start fresh instead of resuming into --out")
    p.add_argument(
        "--flush-every",
        type=int,
        default=512,
        metavar="N",
        help="write finished rows to disk every N images (default 512); a killed run loses at most these",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_sources(p)
    _add_common(p)

    p = sub.add_parser(
        "build",
        help="prepare FP32/FP16/INT8 ONNX and build TensorRT engines",
        description="For each model: prepare the ONNX graph for the precision (TensorRT 11 networks are "
        "strongly typed, so precision is set in the graph: fp16 = mixed precision keeping I/O, "
        "normalisations and softmax in FP32; int8 = explicit Q/DQ calibrated on your images, FP16 "
        "elsewhere), check it against FP32 with ONNX Runtime on the calibration images and print the "
        "agreement, then build a TensorRT engine with a batch profile and a timing cache, cached under a "
        "manifest (ONNX hash, precision, profile, GPU, TensorRT version). Without TensorRT or a GPU it "
        "stops after the preparation, saying so. Needs the 'gpu' extra for the build step.",
    )
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"], help="default fp16")
    p.add_argument(
        "--calib",
        type=user_path,
        metavar="DIR",
        help="folder of typical images: INT8 calibration (required for int8) and the agreement check",
    )
    p.add_argument("--calib-count", type=int, default=64, metavar="N", help="images taken from --calib (default 64)")
    for task in Task:
        p.add_argument(
            f"--{task.value}-profile",
            metavar="MIN,OPT,MAX",
            help=f"batch sizes of the {task.value} engine's optimisation profile (default per architecture; "
            "a model that runs a fixed batch f gets f,f,f)",
        )
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT workspace limit in GiB (default 4)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="builder optimisation level 0-5 (default 3, TensorRT's)")
    p.add_argument("--contexts", type=int, default=3, choices=range(1, 17), metavar="N",  # trt_build.DEFAULT_CONTEXTS, MAX_CONTEXTS
                   help="execution contexts each engine serves at once, one optimisation profile each, 1-16 "
                   "(default 3: `engine run` keeps one per slot of its 3-slot ring and passes over engines with fewer)")
    p.add_argument("--strict", action="store_true", help="fail when the agreement with FP32 is out of bounds")
    p.add_argument("--force", action="store_true", help="redo preparation and build even if cached")
    _add_model_sources(p)
    _add_common(p)

    p = sub.add_parser(
        "bench",
        help="throughput of this engine vs the PyTorch reference",
        description="Run the same images through (a) the PyTorch reference pipeline as the model cards "
        "use the models (PIL/OpenCV decode, the cards' preprocessing, DataLoader, eager model; FP32, and "
        "FP16 autocast + channels_last on a GPU) and (b) this engine per backend and precision available. "
        "Reports per-stage and end-to-end images/s (median and spread over repetitions), speedups "
        "measured in the same run and peak memory, as JSON and a PNG plot. Models use random weights "
        "(speed does not depend on them). Compare two result files with `python -m benchmarks compare`.",
    )
    from benchmarks.suite import add_arguments as add_bench_arguments

    add_bench_arguments(p, include_common=False)
    _add_common(p)

    p = sub.add_parser(
        "export",
        help="export a model to ONNX from a checkpoint (or random weights)",
        description="Build the model's real architecture in PyTorch, load a checkpoint (safetensors or state "
        "dict) or random weights, and export ONNX with a dynamic batch (input 'input', output 'output'). "
        "Needs the 'torch' extra.",
    )
    p.add_argument("model", choices=[t.value for t in Task])
    p.add_argument("--variant", help="spec variant (default: the task's default)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=user_path, help="safetensors or PyTorch state dict")
    src.add_argument("--random-weights", action="store_true", help="random weights (labelled as such in the ONNX)")
    p.add_argument("--out", type=user_path, required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset to export (13..20, default 17)")
    _add_common(p)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cache_dir(args) -> Path:
    from engine.models import default_cache_dir

    return args.cache_dir or default_cache_dir()


def cmd_models(args) -> int:
    registry = SpecRegistry.load(args.spec_file)
    if args.json:
        print(json.dumps([spec_as_dict(s) for s in registry], indent=2))
        return 0
    for s in registry:
        pre = s.preprocess
        mark = lambda name: " (unconfirmed)" if name in s.unconfirmed else ""  # noqa: E731
        print(f"{s.key}  [{s.architecture.value}{mark('architecture')}]  published as {s.published_as}")
        print(f"  labels: {', '.join(s.labels)}; output: {s.output.value}{mark('output')}")
        print(
            f"  input {pre.size}x{pre.size}: {pre.resize.value} resize, {pre.interpolation.value}, "
            f"{pre.crop.value} crop, {pre.channel_order.value}{mark('preprocess.channel_order')}, "
            f"alpha {pre.alpha.value}"
        )
        print(
            f"  mean {list(pre.mean)}{mark('preprocess.mean')}, std {list(pre.std)}{mark('preprocess.std')}"
        )
        if s.hub:
            print(f"  hub: {s.hub.repo} / {s.hub.filename}" + (" (path unconfirmed)" if {"hub.repo", "hub.filename"} & s.unconfirmed else ""))
        if s.notes:
            print(f"  notes: {s.notes}")
        print()
    return 0


def _tasks(args) -> list[Task]:
    """The tasks a command runs: ``--only``'s, or both."""
    return [Task(args.only)] if args.only else list(Task)


def _model_choices(args) -> tuple:
    """One ModelChoice per task selected on the command line (the model-source options)."""
    from engine.models import ModelSource
    from engine.runner import ModelChoice

    choices = []
    for task in _tasks(args):
        t = task.value
        onnx, checkpoint = getattr(args, f"{t}_onnx"), getattr(args, f"{t}_checkpoint")
        source = ModelSource(
            onnx=onnx,
            checkpoint=checkpoint,
            # random weights only where this model is given no file (see --help)
            random_weights=args.random_weights and onnx is None and checkpoint is None,
            download=not args.no_download,
        )
        choices.append(ModelChoice(task, getattr(args, f"{t}_variant"), source))
    return tuple(choices)


def stdout_gone() -> int:
    """The exit code for a reader that left (``engine models | head``): stdout is pointed
    at /dev/null so that the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def cmd_run(args) -> int:
    from engine.runner import RunConfig, run

    config = RunConfig(
        input=args.input,
        out=args.out,
        models=_model_choices(args),
        cache_dir=_cache_dir(args),
        spec_file=args.spec_file,
        batch_size=args.batch_size,
        threads=args.threads,
        precision=args.precision,
        overwrite=args.overwrite,
        flush_every=args.flush_every,
        calib_dir=args.calib,
        calib_count=args.calib_count,
        progress=not args.no_progress and sys.stderr.isatty(),
        device=args.device,
        gpu_backend=args.gpu_backend,
    )
    try:  # SIGTERM and SIGHUP come as KeyboardInterrupt too (main() runs every command under sigterm_as_interrupt)
        summary = run(config, announce=lambda text: print(f"engine: {text}", file=sys.stderr, flush=True))
    except KeyboardInterrupt as exc:
        print(
            f"engine: interrupted; finished rows are kept in {args.out}.parts/. "
            f"Run the same command again to resume.",
            file=sys.stderr,
        )
        return interrupted_status(exc)
    for line in summary.lines():
        print(line)
    return 0


def _resolve_all(args):
    from engine.models import resolve_model

    registry = SpecRegistry.load(args.spec_file)
    return [
        resolve_model(registry.get(c.task, c.variant), c.source, _cache_dir(args)) for c in _model_choices(args)
    ]


def cmd_build(args) -> int:
    from builders.calibration import CalibrationImages
    from builders.precision import Precision, prepare
    from builders.trt_build import BatchProfile, BuildOptions, build_all, engine_profile

    precision = Precision(args.precision)
    # Every option is checked before any work: preparing (int8 calibration) takes minutes.
    tasks = _tasks(args)
    for task in Task:
        if task not in tasks and getattr(args, f"{task.value}_profile"):
            raise EngineError(f"--{task.value}-profile was given, but --only {args.only} builds no {task.value} engine")
    profiles_by_task = {t: BatchProfile.parse(text) for t in tasks if (text := getattr(args, f"{t.value}_profile"))}
    if not math.isfinite(args.workspace_gb) or not 0 < args.workspace_gb <= MAX_WORKSPACE_GB:
        raise EngineError(f"--workspace-gb must be a number of GiB above 0 and at most {MAX_WORKSPACE_GB}, "
                          f"got {args.workspace_gb}")
    options = BuildOptions(workspace_bytes=int(args.workspace_gb * (1 << 30)), optimization_level=args.opt_level,
                           contexts=args.contexts)
    calib = None
    if args.calib is not None:
        calib = CalibrationImages.find(args.calib, args.calib_count)  # hashed once for every model
    elif precision is Precision.INT8:
        raise EngineError("int8 needs calibration images: pass --calib DIR (a folder of typical frames)")
    cache = _cache_dir(args)
    models = _resolve_all(args)
    profiles = {m.spec.key: engine_profile(m.spec, m.info.input.fixed_batch, profiles_by_task.get(m.spec.task))
                for m in models}
    prepared = []
    for model in models:
        p = prepare(
            model.onnx_path, model.spec, precision, calib, cache / "prepared",
            strict=args.strict, force=args.force, output_kind=model.output_kind,
            source_sha256=model.source_sha256,
        )
        if precision is Precision.FP32:
            line = "none needed (the model itself)"
        else:
            line = p.agreement.summary() if p.agreement else "not checked (no --calib images)"
        print(f"{model.spec.key} {precision.value}: {p.path}" + (" (cached)" if p.from_cache else ""))
        print(f"  agreement with fp32: {line}")
        for note in p.notes:
            print(f"  note: {note}")
        prepared.append((p, model.spec))
    for artifact in build_all(prepared, cache / "engines", profiles, options):
        print(f"engine: {artifact.path}" + (" (cached)" if artifact.from_cache else ""))
    return 0


def cmd_bench(args) -> int:
    from benchmarks.suite import main as bench_main

    return bench_main(args)


def cmd_export(args) -> int:
    from builders.export import export_onnx
    from engine.writer import check_output_folder

    registry = SpecRegistry.load(args.spec_file)
    spec = registry.get(Task(args.model), args.variant)
    check_output_folder(args.out)
    path = export_onnx(
        spec, args.out, checkpoint=args.checkpoint, random_seed=0 if args.random_weights else None, opset=args.opset
    )
    print(f"wrote {path}" + ("  (RANDOM weights: not the published model)" if args.random_weights else ""))
    return 0


MAX_WORKSPACE_GB = 1024

COMMANDS = {"models": cmd_models, "run": cmd_run, "build": cmd_build, "bench": cmd_bench, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        with sigterm_as_interrupt():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:  # engine run and engine bench say more themselves
        print(f"engine: {args.command} interrupted; the files it finished are kept (each is written whole)",
              file=sys.stderr)
        return interrupted_status(exc)
    except EngineError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `engine models | head`: the reader left; stop quietly
        return stdout_gone()
    except OSError as exc:  # a full disk anywhere: one line too; any other OSError is a bug here
        message = no_room_message(exc)
        if message is None:
            raise
        print(f"engine: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
