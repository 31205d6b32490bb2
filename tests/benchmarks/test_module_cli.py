"""``python -m benchmarks``: its options reach the work, and its error handling."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import build_parser, main


def test_images_defaults_are_the_full_set_at_seed_zero():
    args = build_parser().parse_args(["images", "--out", "x"])
    assert (args.frames, args.crops, tuple(args.frame_size), args.seed) == (32, 32, (1920, 1080), 0)


def test_images_writes_the_set_its_options_ask_for(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["images", "--out", str(out), "--frames", "1", "--crops", "2", "--frame-size", "64x36", "--seed", "7"]) == 0
    assert capsys.readouterr().out.strip() == f"3 images in {out}"
    spec = json.loads((out / "manifest.json").read_text())["spec"]
    assert (spec["frames"], spec["crops"], spec["seed"], list(spec["frame_size"])) == (1, 2, 7, [64, 36])


def test_an_os_error_that_is_not_about_room_keeps_its_traceback(tmp_path, monkeypatch):
    import benchmarks.images

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(benchmarks.images, "generate_image_set", refuse)
    with pytest.raises(PermissionError):
        main(["images", "--out", str(tmp_path / "set"), "--frames", "1", "--crops", "0"])


def _module(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks", *args], stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("flag, info", [(None, False), ("-v", True)])
def test_verbose_turns_on_the_info_lines(flag, info, tmp_path):
    args = [a for a in (flag,) if a] + ["images", "--out", str(tmp_path / "set"), "--frames", "1", "--crops", "0",
                                        "--frame-size", "64x36"]
    proc = _module(*args, stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert ("INFO benchmarks.images: generating 1 frames and 0 crops" in err) is info, err


def test_a_reader_that_left_ends_the_command_quietly():
    """``python -m benchmarks schema | head -c0``: the pipe is closed before the first
    write, so the print meets EPIPE; the status is the shell's 128 + SIGPIPE, no traceback."""
    proc = _module("schema", stdout=subprocess.PIPE)
    proc.stdout.close()  # long before the child's imports are done and it prints
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
