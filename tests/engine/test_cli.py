"""CLI behaviour: help, build without TensorRT, CPU runs of the prepared precisions."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from engine.cli import build_parser, main


@pytest.mark.parametrize("command", ["models", "run", "build", "bench", "export"])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out) > 300


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 90, 3), dtype=np.uint8)).save(root / f"c{i}.png")
    (root / "junk.jpg").write_bytes(b"junk")
    return root


def _gender_args(model_cache_dir):
    return ["--only", "gender", "--random-weights", "--no-download", "--cache-dir", str(model_cache_dir)]


def test_build_without_tensorrt_prepares_reports_and_stops_in_one_line(calib_dir, random_models, model_cache_dir, capsys):
    from builders.trt_build import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: the build would run")
    random_models["gender/alpha"]
    code = main(["build", "--precision", "fp16", "--calib", str(calib_dir), *_gender_args(model_cache_dir)])
    captured = capsys.readouterr()
    assert code == 2
    assert "gender/alpha fp16" in captured.out and "argmax agreement 100.0%" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("engine: error: TensorRT engine build needs TensorRT and an NVIDIA GPU")
    assert list((model_cache_dir / "prepared").glob("gender-alpha.fp16.*.onnx"))


def test_int8_needs_calibration_images(random_models, model_cache_dir, capsys):
    random_models["gender/alpha"]
    assert main(["build", "--precision", "int8", *_gender_args(model_cache_dir)]) == 2
    assert "--calib DIR" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_cpu_run_of_prepared_precision_agrees_with_fp32(precision, calib_dir, random_models, model_cache_dir, tmp_path):
    random_models["gender/alpha"]
    results = {}
    for p in ("fp32", precision):
        out = tmp_path / f"{p}.parquet"
        assert main(["run", str(calib_dir), "--out", str(out), "--precision", p, "--calib", str(calib_dir),
                     "--no-progress", *_gender_args(model_cache_dir)]) == 0
        results[p] = pl.read_parquet(out).sort("path")
        assert pl.read_parquet_metadata(out)["engine.config"].count(f'"precision": "{p}"') == 1
    a, b = (results[p]["gender_p_female"].fill_null(-1).to_numpy() for p in ("fp32", precision))
    assert results["fp32"]["error"].to_list() == results[precision]["error"].to_list()
    np.testing.assert_allclose(a, b, atol=2e-2)


def test_parser_has_the_issue_commands():
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"models", "run", "build", "bench", "export"} <= set(sub)


def test_build_contexts_option_defaults_to_the_executor_ring_and_refuses_nonsense(capsys):
    from builders.trt_build import DEFAULT_CONTEXTS, MAX_CONTEXTS

    parser = build_parser()
    assert parser.parse_args(["build"]).contexts == DEFAULT_CONTEXTS
    assert parser.parse_args(["build", "--contexts", str(MAX_CONTEXTS)]).contexts == MAX_CONTEXTS
    for bad in ("0", str(MAX_CONTEXTS + 1), "two"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["build", "--contexts", bad])
        assert exc.value.code == 2
    assert "--contexts" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--only", "gender", "--quality-profile", "1,4,8"], "--quality-profile was given, but --only gender"),
        (["--gender-profile", "4,2,8"], "profile"),
        (["--gender-profile", "1,8,100000000"], "batch profile max 100000000 is above 4096"),
        (["--workspace-gb", "nan"], "--workspace-gb must be a number of GiB above 0"),
        (["--workspace-gb", "inf"], "--workspace-gb must be a number of GiB above 0"),
        (["--workspace-gb", "0"], "--workspace-gb must be a number of GiB above 0"),
        (["--workspace-gb", "1e308"], "at most 1024"),
    ],
)
def test_build_options_are_checked_before_any_model_work(extra, message, tmp_path, capsys):
    # an empty cache and no download: any model work would fail first, with another message
    code = main(["build", "--precision", "fp16", "--no-download", "--cache-dir", str(tmp_path / "empty"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("engine: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("command", ["build", "export", "models"])
def test_ctrl_c_in_any_command_is_one_line(command, monkeypatch, capsys):
    import engine.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    argv = {"build": ["build"], "export": ["export", "gender", "--random-weights", "--out", "x.onnx"],
            "models": ["models"]}[command]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == f"engine: {command} interrupted; the files it finished are kept (each is written whole)\n"


def test_a_closed_pipe_ends_the_output_quietly(tmp_path):
    import subprocess
    import sys

    # `true` exits without reading, long before the interpreter is up: the output meets a closed pipe
    proc = subprocess.run(
        f"'{sys.executable}' -m engine models | true; echo ${{PIPESTATUS[0]}}", shell=True, capture_output=True,
        text=True, timeout=120, executable="/bin/bash",
    )
    assert proc.stderr == "" and proc.stdout.strip() == "141"


@pytest.mark.parametrize("signame,status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_while_the_cli_is_still_importing_ends_it_in_one_line(signame, status):
    """The console script's first instant: a real signal arrives while engine.cli is
    being imported (sent by an import hook, so the moment is certain)."""
    import subprocess
    import sys

    code = (
        "import os, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'engine.cli':\n"
        f"            os.kill(os.getpid(), signal.{signame})\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
        "from engine.console import main\n"
        "sys.exit(main(['models']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr == "engine: interrupted while starting; nothing was done\n" and proc.stdout == ""


def test_the_console_script_runs_the_cli(monkeypatch, capsys):
    import engine.cli
    from engine.console import main

    assert main(["models", "--json"]) == 0
    capsys.readouterr()

    def ctrl_c(*args):
        raise KeyboardInterrupt

    # a Ctrl-C in the command, then a second one while the CLI reports the first
    monkeypatch.setitem(engine.cli.COMMANDS, "models", ctrl_c)
    monkeypatch.setattr(engine.cli, "interrupted_status", ctrl_c)
    assert main(["models"]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("engine: models interrupted") and err[1:] == ["engine: interrupted"], err


def test_sigterm_is_an_interrupt_inside_and_its_handler_comes_back_after():
    import signal
    import threading

    from engine.signals import interrupted_status, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    hup_before = signal.getsignal(signal.SIGHUP)
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        with pytest.raises(KeyboardInterrupt) as caught:
            with sigterm_as_interrupt():
                signal.raise_signal(signum)
        assert interrupted_status(caught.value) == status
    assert interrupted_status(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGHUP) is hup_before
    # under nohup (SIGHUP ignored) the run must outlive the terminal: left ignored
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            signal.raise_signal(signal.SIGHUP)  # nothing happens
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, hup_before)
    errors = []

    def off_main():
        try:
            with sigterm_as_interrupt():  # signal.signal() refuses off the main thread: left as it is
                pass
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=off_main)
    t.start()
    t.join()
    assert errors == [] and signal.getsignal(signal.SIGTERM) is before


def test_a_handler_set_outside_python_is_put_back_as_the_default(monkeypatch):
    """signal.signal() gives None for a handler Python did not set (one an embedding
    program installed): what is put back after is then the default, not None."""
    import signal

    from engine.signals import sigterm_as_interrupt

    real = signal.signal
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    put = []

    def as_if_set_outside_python(signum, handler):
        real(signum, handler)
        put.append((signum, handler))
        return None

    monkeypatch.setattr(signal, "signal", as_if_set_outside_python)
    try:
        with sigterm_as_interrupt():
            pass
    finally:
        monkeypatch.undo()
        for signum, handler in before.items():
            signal.signal(signum, handler)
    handled = [s for s, handler in before.items() if handler is not signal.SIG_IGN]  # nohup: SIGHUP left alone
    assert put[len(handled):] == [(s, signal.SIG_DFL) for s in handled]


def test_a_termination_names_its_signal():
    import signal

    from engine.signals import Terminated

    exc = Terminated(signal.SIGTERM)
    assert isinstance(exc, KeyboardInterrupt) and str(exc) == "SIGTERM" and exc.signum == signal.SIGTERM


@pytest.mark.parametrize("module, args, prefix", [
    ("engine", ["bench", "--frames", "1", "--crops", "0", "--scenario", "gender"], "engine"),
    ("benchmarks", ["images", "--frames", "1", "--crops", "0"], "benchmarks"),
])
def test_no_room_to_write_is_one_line_from_either_entry_point(module, args, prefix, tmp_path):
    """A write refused for want of room outside the result writer (here the benchmark's
    first 1920x1080 frame, past a 100 KB file-size limit) is one line, not a traceback."""
    from tests.file_limit import run_module_under_file_size_limit

    r = run_module_under_file_size_limit(module, [*args, "--out", tmp_path / "bench"], 100_000, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"{prefix}: error: File too large: make room and run the command again"


def test_no_room_message_names_the_file_and_only_takes_no_room_errors():
    import errno

    from engine.errors import no_room_message

    assert no_room_message(OSError(errno.ENOSPC, "No space left on device", "/data/r.parquet")) == \
        "No space left on device (/data/r.parquet): make room and run the command again"
    assert no_room_message(OSError(errno.EDQUOT, "Disk quota exceeded")) == \
        "Disk quota exceeded: make room and run the command again"
    assert no_room_message(OSError(errno.EACCES, "Permission denied", "/data")) is None
    assert no_room_message(ValueError("no room")) is None


def test_run_options_default_to_what_the_help_says():
    args = build_parser().parse_args(["run", "frames"])
    assert (args.out, args.batch_size, args.flush_every, args.device, args.gpu_backend, args.precision) == \
        (Path("results.parquet"), 16, 512, "auto", "tensorrt", None)
    build = build_parser().parse_args(["build"])
    assert (build.precision, build.calib_count, build.workspace_gb, build.opt_level) == ("fp16", 64, 4.0, 3)
    export = build_parser().parse_args(["export", "gender", "--random-weights", "--out", "g.onnx"])
    assert export.opset == 17


def _choices(*argv):
    from engine.cli import _model_choices

    return {c.task.value: c for c in _model_choices(build_parser().parse_args(["run", "frames", *argv]))}


def test_random_weights_fill_in_only_the_models_given_no_checkpoint_or_onnx(tmp_path):
    ckpt, onnx = tmp_path / "g.safetensors", tmp_path / "q.onnx"
    got = _choices("--random-weights", "--gender-checkpoint", str(ckpt))
    assert got["gender"].source.checkpoint == ckpt and not got["gender"].source.random_weights
    assert got["quality"].source.random_weights
    got = _choices("--random-weights", "--quality-onnx", str(onnx))
    assert got["quality"].source.onnx == onnx and not got["quality"].source.random_weights
    assert got["gender"].source.random_weights


def test_variant_only_and_no_download_reach_the_model_choices():
    got = _choices("--quality-variant", "head_crop", "--no-download")
    assert got["quality"].variant == "head_crop" and got["gender"].variant is None
    assert not got["quality"].source.download and not got["gender"].source.download
    assert all(c.source.download for c in _choices().values())
    assert list(_choices("--only", "quality")) == ["quality"]


def test_verbosity_sets_the_log_level(monkeypatch):
    import engine.cli as cli

    levels = []
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    for n in (0, 1, 2, 3):
        cli._setup_logging(n)
    assert levels == [logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]


def test_models_json_is_the_specs_as_json_and_nothing_else(capsys):
    assert main(["models", "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    assert {f"{s['task']}/{s['variant']}" for s in specs} >= {"gender/alpha", "quality/head_crop"}


def test_models_marks_an_unconfirmed_hub_path_only(capsys):
    assert main(["models"]) == 0
    hubs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  hub:")]
    assert hubs and all(line.endswith(" (path unconfirmed)") for line in hubs[:2])
    assert any(not line.endswith("(path unconfirmed)") for line in hubs)


def test_a_workspace_of_exactly_the_limit_is_accepted(tmp_path, capsys):
    from engine.cli import MAX_WORKSPACE_GB

    code = main(["build", "--precision", "fp16", "--no-download", "--cache-dir", str(tmp_path / "empty"),
                 "--workspace-gb", str(MAX_WORKSPACE_GB)])
    err = capsys.readouterr().err
    assert code == 2 and "--workspace-gb" not in err and "is not cached" in err


def _tiny_gender(tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    return make_tiny_classifier(tmp_path / "g.onnx", size=224, classes=2, metadata={"engine.output_kind": "logits"})


def _one_image(folder):
    folder.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "a.png")
    return folder


def _tiny_gender_run(tmp_path, *more):
    """`engine run` of one image with the tiny gender model, caching under tmp_path."""
    return ["run", str(_one_image(tmp_path / "in")), "--out", str(tmp_path / "r.parquet"), "--only", "gender",
            "--gender-onnx", str(_tiny_gender(tmp_path)), "--cache-dir", str(tmp_path / "cache"), *more]


def _no_tensorrt():
    from builders.trt_build import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: the build would run")


@pytest.mark.parametrize("precision, agreement, reused", [("fp32", "none needed (the model itself)", False),
                                                          ("fp16", "not checked (no --calib images)", True)])
def test_build_reports_each_prepared_graph_and_says_when_it_was_cached(precision, agreement, reused, tmp_path, capsys):
    _no_tensorrt()
    args = ["build", "--precision", precision, "--only", "gender", "--gender-onnx", str(_tiny_gender(tmp_path)),
            "--cache-dir", str(tmp_path / "cache")]
    for cached in (False, True):
        assert main(args) == 2  # prepared, then no TensorRT here
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"gender/alpha {precision}: ") and out[0].endswith(" (cached)") == (cached and reused)
        assert out[1] == f"  agreement with fp32: {agreement}"


def test_run_shows_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(_tiny_gender_run(tmp_path)) == 0
    assert "classifying" not in capsys.readouterr().err


def test_a_cache_dir_given_with_a_tilde_holds_every_file_the_run_caches(tmp_path, monkeypatch, capsys):
    """`--cache-dir=~/c` reaches the program unexpanded (the shell expands no tilde after
    `=`): the models and the prepared graphs must all go to the home folder's c/."""
    home = tmp_path / "home"
    home.mkdir()
    _tiny_gender(home)
    _one_image(home / "in")
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "work")
    assert main(["run", "~/in", "--out=~/r.parquet", "--only", "gender", "--gender-onnx=~/g.onnx",
                 "--precision", "fp16", "--cache-dir=~/c", "--no-progress"]) == 0
    assert list((home / "c" / "prepared").glob("gender-alpha.fp16.*.onnx"))
    assert pl.read_parquet(home / "r.parquet").height == 1
    assert list((tmp_path / "work").iterdir()) == []  # no folder named "~" here


@pytest.mark.parametrize("parser", ["engine", "benchmarks"])
def test_every_path_option_expands_a_tilde(parser, monkeypatch):
    import argparse

    from benchmarks.__main__ import build_parser as bench_parser
    from engine.cli import build_parser

    monkeypatch.setenv("HOME", "/home/someone")
    top = build_parser() if parser == "engine" else bench_parser()
    commands = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    seen = 0
    for sub in (p for c in commands for p in c.choices.values()):
        for action in sub._actions:
            if action.type is None or not callable(action.type):
                continue
            try:
                value = action.type("~/x")
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                continue  # a number, a size, a choice
            if isinstance(value, Path):
                seen += 1
                assert value == Path("/home/someone/x"), (sub.prog, action.dest)
    assert seen >= (26 if parser == "engine" else 9)  # as many as there are today


def test_overwrite_starts_afresh_instead_of_resuming(tmp_path, capsys):
    args = _tiny_gender_run(tmp_path, "--no-progress")
    assert main(args) == 0
    assert "images: 1 (0 errors), 0 already done" in capsys.readouterr().out
    assert main([*args, "--overwrite"]) == 0
    assert "images: 1 (0 errors), 0 already done" in capsys.readouterr().out
    assert pl.read_parquet(tmp_path / "r.parquet").height == 1


def test_an_int8_run_on_the_cpu_needs_calibration_images_too(tmp_path, capsys):
    assert main(_tiny_gender_run(tmp_path, "--precision", "int8", "--no-progress")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the line naming the path taken
    assert err.startswith("engine: error: int8 needs calibration images") and "--calib DIR" in err


def test_build_checks_the_agreement_on_calib_count_images(tmp_path, capsys):
    _no_tensorrt()
    (tmp_path / "calib").mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (60 * i, 90, 200)).save(tmp_path / "calib" / f"{i}.png")
    assert main(["build", "--precision", "fp16", "--calib", str(tmp_path / "calib"), "--calib-count", "2",
                 "--only", "gender", "--gender-onnx", str(_tiny_gender(tmp_path)),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "  agreement with fp32: 2 images: argmax agreement" in capsys.readouterr().out


def test_build_prints_the_notes_of_each_prepared_graph(tmp_path, capsys):
    """int8: what the quantiser put in (its Q/DQ counts) is a note under the graph's lines."""
    _no_tensorrt()
    (tmp_path / "calib").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30 + i), (90, 60 * i, 200)).save(tmp_path / "calib" / f"{i}.png")
    assert main(["build", "--precision", "int8", "--calib", str(tmp_path / "calib"), "--only", "gender",
                 "--gender-onnx", str(_tiny_gender(tmp_path)), "--cache-dir", str(tmp_path / "cache")]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gender/alpha int8: ") and out[1].startswith("  agreement with fp32: 2 images")
    notes = [line for line in out[2:] if line.startswith("  note: ")]
    assert notes and re.fullmatch(r"  note: Q/DQ: [1-9]\d* QuantizeLinear, [1-9]\d* DequantizeLinear", notes[0]), out
