"""Hostile and odd inputs through the whole `engine run`: each gives a correct result
or an error row naming the cause; none stops the run or corrupts the output."""

from __future__ import annotations

import io
import os

import numpy as np
import polars as pl
import pytest
from PIL import Image

from engine.cli import main


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w=64, h=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    arr = np.stack([xx * 4 % 256, yy * 5 % 256, (xx * yy) % 256], -1) + rng.integers(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _animated(fmt: str) -> bytes:
    frames = [_photo(seed=i) for i in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


# name -> (bytes, expectation): "ok" = must classify, "error" = must be an error row,
# "either" = a result or an error row, both fine
def _cases() -> dict[bytes, tuple[bytes, str]]:
    jpeg = _save(_photo(), "JPEG")
    png = _save(_photo(), "PNG")
    sixteen = Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21))
    rgba = Image.fromarray(np.dstack([np.asarray(_photo()), np.full((48, 64), 128, np.uint8)]), "RGBA")
    return {
        b"empty.jpg": (b"", "error"),
        b"text.jpg": (b"just some words\n", "error"),
        b"truncated.jpg": (jpeg[: len(jpeg) // 3], "either"),
        b"truncated.png": (png[:100], "error"),
        b"one_pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok"),
        b"sixteen_bit.png": (_save(sixteen, "PNG"), "ok"),
        b"cmyk.jpg": (_save(_photo().convert("CMYK"), "JPEG"), "ok"),
        b"gray.jpg": (_save(_photo().convert("L"), "JPEG"), "ok"),
        b"rgba.png": (_save(rgba, "PNG"), "ok"),
        b"palette.png": (_save(_photo().convert("P"), "PNG"), "ok"),
        b"animated.gif": (_animated("GIF"), "ok"),
        b"animated.webp": (_animated("WEBP"), "ok"),
        b"with spaces in name.png": (png, "ok"),
        b"caf\xe9 latin-1 name.png": (png, "ok"),  # not valid UTF-8
        b"caf\\xe9 latin-1 name.png": (jpeg, "ok"),  # its escaped name, spelt out: another file
        b"huge_16000.png": (_save(Image.new("L", (16000, 16000), 90), "PNG"), "either"),
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, random_models, model_cache_dir):
    random_models["gender/alpha"]
    root = tmp_path_factory.mktemp("hostile")
    broot = os.fsencode(root)
    expect = {}
    for name, (data, what) in _cases().items():
        with open(os.path.join(broot, name), "wb") as f:
            f.write(data)
        expect[name] = what
    # a folder named like an image: walked, its image classified
    os.mkdir(os.path.join(broot, b"folder.png"))
    with open(os.path.join(broot, b"folder.png", b"inner.png"), "wb") as f:
        f.write(_save(_photo(seed=5), "PNG"))
    expect[b"folder.png/inner.png"] = "ok"
    os.symlink(root, os.path.join(broot, b"loop"))  # symlink loop: skipped
    os.symlink(os.path.join(broot, b"gone.png"), os.path.join(broot, b"dangling.png"))
    expect[b"dangling.png"] = "error"
    os.mkfifo(os.path.join(broot, b"fifo.png"))  # reading it would block forever
    expect[b"fifo.png"] = "error"

    out = tmp_path_factory.mktemp("hostile-out") / "r.parquet"
    code = main(["run", str(root), "--out", str(out), "--only", "gender", "--random-weights", "--no-download",
                 "--cache-dir", str(model_cache_dir), "--batch-size", "4", "--no-progress"])
    assert code == 0
    df = pl.read_parquet(out)
    rows = {}
    for row in df.iter_rows(named=True):
        rows[row["path"][len(str(root)) + 1 :]] = row
    return expect, rows, df


def _key(name: bytes) -> str:
    return name.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def test_every_file_has_exactly_one_row(hostile):
    expect, rows, df = hostile
    assert df["path"].n_unique() == df.height
    assert set(rows) == {_key(n) for n in expect}


@pytest.mark.parametrize("name, what", [(n, w) for n, (_, w) in _cases().items()] + [
    (b"folder.png/inner.png", "ok"), (b"dangling.png", "error"), (b"fifo.png", "error")])
def test_each_input_gives_a_result_or_a_named_error(hostile, name, what):
    _, rows, _ = hostile
    row = rows[_key(name)]
    if row["error"] is None:
        assert what in ("ok", "either"), f"{name!r} should have failed"
        p = row["gender_p_female"] + row["gender_p_male"]
        assert abs(p - 1) < 1e-5 and row["gender_label"] in ("female", "male")
        assert row["width"] >= 1 and row["height"] >= 1
    else:
        assert what in ("error", "either"), f"{name!r} failed: {row['error']}"
        assert row["gender_label"] is None
        assert len(row["error"]) > 5 and "\n" not in row["error"]


def test_error_causes_are_named(hostile):
    _, rows, _ = hostile
    assert "empty" in rows["empty.jpg"]["error"]
    assert "not an image" in rows["text.jpg"]["error"]
    assert "not a regular file" in rows["fifo.png"]["error"]
    assert "No such file" in rows["dangling.png"]["error"]


def test_non_utf8_name_is_escaped_not_lost(hostile):
    _, rows, _ = hostile
    assert "caf\\xe9 latin-1 name.png" in rows  # the byte 0xe9
    assert "caf\\\\xe9 latin-1 name.png" in rows  # a backslash, then "xe9": a row of its own


@pytest.fixture
def world_tmp():
    """A fresh folder in /tmp (pytest's tmp_path sits below a folder only root may enter)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="engine-unreadable-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unreadable_file_is_an_error_row(world_tmp, random_models):
    """A file the user may not read. Root reads everything, so as root the run is made
    with the effective uid/gid of the unprivileged user 'nobody' (restored afterwards);
    a first run as root imports and loads everything the second one needs."""
    import pwd
    import shutil

    work = world_tmp
    (work / "images").mkdir(parents=True)
    _photo().save(work / "images" / "readable.png")
    _photo(seed=1).save(work / "images" / "secret.png")
    onnx = work / "gender.onnx"
    shutil.copy(random_models["gender/alpha"].onnx_path, onnx)
    (work / "out").mkdir()

    def run(name):
        return main(["run", str(work / "images"), "--out", str(work / "out" / name), "--only", "gender",
                     "--gender-onnx", str(onnx), "--cache-dir", str(work / "cache"), "--no-download",
                     "--no-progress"])

    if os.geteuid() != 0:
        os.chmod(work / "images" / "secret.png", 0)
        assert run("r.parquet") == 0
    else:
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no 'nobody' user to drop to")
        assert run("warm.parquet") == 0  # as root: imports, DALI plugins, the onnx cache
        for p in [*work.rglob("*"), work]:
            os.chmod(p, 0o777 if p.is_dir() else 0o666)
        os.chmod(work / "images" / "secret.png", 0)
        os.setegid(nobody.pw_gid)
        os.seteuid(nobody.pw_uid)
        try:
            code = run("r.parquet")
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert code == 0
    df = pl.read_parquet(work / "out" / "r.parquet")
    errors = dict(zip((os.path.basename(p) for p in df["path"]), df["error"]))
    assert errors["readable.png"] is None
    assert errors["secret.png"] == "cannot read: Permission denied"
