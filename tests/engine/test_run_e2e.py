"""`engine run` end to end on a folder the test creates: both real architectures
(random weights), DALI CPU preprocessing, ONNX Runtime, parquet."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from engine.cli import main
from engine.postprocess import softmax
from engine.preprocess import DaliPreprocessor

GOOD = {
    "frames/f1.png": ("PNG", (96, 54), "RGB"),
    "frames/f2.jpg": ("JPEG", (80, 45), "RGB"),
    "frames/sub/f3.webp": ("WEBP", (64, 64), "RGB"),
    "heads/h1.bmp": ("BMP", (40, 48), "RGB"),
    "heads/h2 gray.png": ("PNG", (50, 50), "L"),
    "heads/h3_rgba.png": ("PNG", (48, 40), "RGBA"),
}
BAD = {
    "bad/empty.png": b"",
    "bad/text.jpg": b"hello, I am not a picture\n",
    "bad/truncated.png": None,  # filled below: first bytes of a real PNG
}


def _image(size, mode, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    base = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        a = np.where(xx < w // 2, 255, 0).astype(np.uint8)
        return Image.fromarray(np.dstack([base, a]), "RGBA")
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    for i, (rel, (fmt, size, mode)) in enumerate(GOOD.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _image(size, mode, i).save(p, format=fmt)
    buf = io.BytesIO()
    _image((64, 64), "RGB", 99).save(buf, format="PNG")
    BAD["bad/truncated.png"] = buf.getvalue()[:120]
    for rel, data in BAD.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "notes.txt").write_text("not collected: wrong extension")
    return root


@pytest.fixture(scope="module")
def run_result(folder, random_models, model_cache_dir, tmp_path_factory):
    for key in random_models:  # export both once (session cache), reused by --random-weights
        random_models[key]
    out = tmp_path_factory.mktemp("out") / "results.parquet"
    code = main(
        ["run", str(folder), "--out", str(out), "--random-weights", "--no-download",
         "--cache-dir", str(model_cache_dir), "--batch-size", "4", "--no-progress"]
    )
    assert code == 0
    return out


def test_one_row_per_file_with_schema(run_result, folder):
    df = pl.read_parquet(run_result)
    assert df.height == len(GOOD) + len(BAD)
    assert set(df["path"]) == {os.path.abspath(folder / rel) for rel in [*GOOD, *BAD]}
    expected = ["path", "error", "width", "height", "gender_label", "gender_p_female", "gender_p_male",
                "quality_label", "quality_p_poor", "quality_p_ok", "quality_p_good", "quality_p_excellent",
                "gender_model", "gender_weights", "quality_model", "quality_weights"]
    assert df.columns == expected
    assert df.schema["gender_p_female"] == pl.Float32 and df.schema["width"] == pl.Int32


def test_good_rows_have_valid_probabilities_and_labels(run_result, folder):
    df = pl.read_parquet(run_result).filter(pl.col("error").is_null())
    assert df.height == len(GOOD)
    g = df.select("gender_p_female", "gender_p_male").to_numpy()
    q = df.select("quality_p_poor", "quality_p_ok", "quality_p_good", "quality_p_excellent").to_numpy()
    for p in (g, q):
        assert ((p >= 0) & (p <= 1)).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert set(df["gender_label"]) <= {"female", "male"}
    assert set(df["quality_label"]) <= {"poor", "ok", "good", "excellent"}
    # the label is the argmax of the row's probabilities
    assert (np.array(["female", "male"])[g.argmax(1)] == df["gender_label"].to_numpy()).all()
    assert set(df["gender_weights"]) == {"random"} and set(df["quality_model"]) == {"quality/baseline"}
    sizes = {os.path.basename(p): (w, h) for p, w, h in df.select("path", "width", "height").iter_rows()}
    assert sizes["f1.png"] == (96, 54) and sizes["h2 gray.png"] == (50, 50)


def test_bad_files_are_error_rows(run_result):
    df = pl.read_parquet(run_result).filter(pl.col("error").is_not_null())
    by_name = dict(zip((os.path.basename(p) for p in df["path"]), df["error"]))
    assert set(by_name) == {"empty.png", "text.jpg", "truncated.png"}
    assert "empty" in by_name["empty.png"]
    assert df["gender_label"].is_null().all() and df["quality_p_ok"].is_null().all()


def test_rows_match_each_image_processed_alone(run_result, random_models):
    """Batching and reordering must not mix rows up: recompute every good file on its own."""
    import onnxruntime as ort

    df = pl.read_parquet(run_result).filter(pl.col("error").is_null())
    views = [(k, random_models[k].spec.preprocess) for k in random_models]
    sessions = {k: ort.InferenceSession(str(random_models[k].onnx_path)) for k in random_models}
    with DaliPreprocessor(views=views, max_batch=1, num_threads=1, device="cpu") as pre:
        for row in df.iter_rows(named=True):
            with open(row["path"], "rb") as f:
                res = pre.process([f.read()])
            assert res.ok == [0]
            for key, cols in (("gender/alpha", ["gender_p_female", "gender_p_male"]),
                              ("quality/baseline", ["quality_p_poor", "quality_p_ok", "quality_p_good", "quality_p_excellent"])):
                logits = sessions[key].run(None, {"input": res.views[key]})[0]
                np.testing.assert_allclose([row[c] for c in cols], softmax(logits)[0], atol=2e-4)


def test_summary_says_random_weights(folder, model_cache_dir, tmp_path, capsys, random_models):
    random_models["gender/alpha"]
    out = tmp_path / "g.parquet"
    code = main(["run", str(folder / "heads"), "--out", str(out), "--only", "gender", "--random-weights",
                 "--cache-dir", str(model_cache_dir), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "random weights were used" in text and "images: 3 (0 errors)" in text
    df = pl.read_parquet(out)
    assert not any(c.startswith("quality_") for c in df.columns)
    # rerun: everything is already there, nothing is redone and nothing is duplicated
    assert main(["run", str(folder / "heads"), "--out", str(out), "--only", "gender", "--random-weights",
                 "--cache-dir", str(model_cache_dir), "--no-progress"]) == 0
    assert "3 already done" in capsys.readouterr().out
    assert pl.read_parquet(out).height == 3


def test_missing_input_is_one_line_error(tmp_path, capsys):
    code = main(["run", str(tmp_path / "nope"), "--out", str(tmp_path / "r.parquet"), "--random-weights"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("engine: error: input not found") and "\n" not in err


def test_missing_model_offline_is_one_line_error(folder, tmp_path, capsys):
    code = main(["run", str(folder), "--out", str(tmp_path / "r.parquet"), "--no-download",
                 "--cache-dir", str(tmp_path / "empty-cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--random-weights" in err and "\n" not in err
    assert not (tmp_path / "r.parquet").exists()


def test_models_command_marks_unconfirmed(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gender/alpha" in out and "quality/head_crop" in out and "(unconfirmed)" in out


def test_resume_with_another_spec_is_refused(folder, model_cache_dir, tmp_path, capsys, random_models):
    random_models["gender/alpha"]
    out = tmp_path / "g.parquet"
    args = ["run", str(folder / "heads"), "--out", str(out), "--only", "gender", "--random-weights",
            "--cache-dir", str(model_cache_dir), "--no-progress"]
    assert main(args) == 0
    spec = tmp_path / "bgr.toml"
    spec.write_text("[gender.alpha.preprocess]\nchannel_order = 'bgr'\n")
    capsys.readouterr()
    assert main([*args, "--spec-file", str(spec)]) == 2
    assert "another configuration (its gender/alpha had another spec (preprocessing" in capsys.readouterr().err
    assert main([*args, "--precision", "fp16"]) == 2
    assert "another configuration (it was made at fp32, this run is fp16)" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_any_model_is_loaded(folder, tmp_path, capsys):
    args = ["run", str(folder / "heads"), "--only", "gender", "--gender-onnx", str(tmp_path / "no-such.onnx"),
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    (tmp_path / "a-folder").mkdir()
    for out, message in ((tmp_path / "missing" / "r.parquet", "output folder does not exist"),
                         (tmp_path / "a-folder", "output path is a folder")):
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-such.onnx" not in err and "path" not in err.split("error:")[0]


def _gender_args(folder, out, cache, *extra):
    return ["run", str(folder), "--out", str(out), "--only", "gender", "--cache-dir", str(cache), "--no-progress", *extra]


def test_resume_names_a_user_onnx_by_content_not_by_path(folder, model_cache_dir, tmp_path, capsys, random_models,
                                                        monkeypatch):
    import onnx
    from onnx import numpy_helper

    user = tmp_path / "models" / "user.onnx"
    user.parent.mkdir()
    user.write_bytes(random_models["gender/alpha"].onnx_path.read_bytes())
    out = tmp_path / "u.parquet"
    assert main(_gender_args(folder / "heads", out, model_cache_dir, "--gender-onnx", str(user))) == 0
    # the same file reached by another path: the same model, resumed
    monkeypatch.chdir(tmp_path / "models")
    capsys.readouterr()
    assert main(_gender_args(folder / "heads", out, model_cache_dir, "--gender-onnx", "../models/user.onnx")) == 0
    assert "3 already done" in capsys.readouterr().out
    # another model written over the same file: refused, nothing mixed in
    model = onnx.load(str(user))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 1 and i.name.endswith("bias"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1.0, init.name))
    onnx.save(model, str(user))
    assert main(_gender_args(folder / "heads", out, model_cache_dir, "--gender-onnx", str(user))) == 2
    assert "another configuration" in capsys.readouterr().err
    assert pl.read_parquet(out).height == 3


def test_random_weights_fill_in_only_models_given_no_file(folder, model_cache_dir, tmp_path, capsys, random_models):
    from tests.model_fixtures import make_tiny_classifier

    random_models["quality/baseline"]
    from builders.export import META_OUTPUT_KIND

    # a user's own model (no random-weights metadata), declaring logits
    user = make_tiny_classifier(tmp_path / "user.onnx", size=224, classes=2, metadata={META_OUTPUT_KIND: "logits"})
    out = tmp_path / "mix.parquet"
    args = ["run", str(folder / "heads" / "h1.bmp"), "--out", str(out), "--gender-onnx", str(user),
            "--random-weights", "--cache-dir", str(model_cache_dir), "--no-progress"]
    assert main(args) == 0
    row = pl.read_parquet(out).row(0, named=True)
    assert row["gender_weights"] == "user_onnx" and row["quality_weights"] == "random"


def test_int8_record_names_the_calibration_set(random_models, tmp_path):
    from engine.runner import calibration_images, run_config_record

    models = [random_models["gender/alpha"]]
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        _image((32, 32), "RGB", seed).save(tmp_path / name / "c.png")

    def record(precision, folder, count=None):
        return run_config_record(models, precision, calibration_images(tmp_path / folder, count))

    a, b = record("int8", "a"), record("int8", "b")
    assert a["calibration_sha256"] and a != b
    assert record("int8", "a") == a  # deterministic
    _image((32, 32), "RGB", 3).save(tmp_path / "a" / "d.png")
    assert record("int8", "a", 1) != record("int8", "a", 2)
    assert record("fp32", "a") == record("fp32", "b")


def test_an_int8_run_reads_its_calibration_set_once(tmp_path, monkeypatch, capsys):
    """The run record and the model's int8 graph (its calibration and its cache name)
    share one reading of the calibration images; a rerun resumes under that record."""
    import builders.calibration as calibration
    from tests.engine.test_user_models import LOGITS, tiny

    reads = []
    real = calibration.calibration_set_sha256
    monkeypatch.setattr(calibration, "calibration_set_sha256", lambda paths: (reads.append(len(paths)), real(paths))[1])
    root, calib = tmp_path / "in", tmp_path / "calib"
    for folder, seeds in ((root, (1, 2)), (calib, (3, 4, 5))):
        folder.mkdir()
        for seed in seeds:
            _image((40, 30), "RGB", seed).save(folder / f"{seed}.png")
    onnx_path = tiny(tmp_path / "g.onnx", meta=LOGITS)
    args = ["run", str(root), "--out", str(tmp_path / "o.parquet"), "--only", "gender", "--gender-onnx", str(onnx_path),
            "--precision", "int8", "--calib", str(calib), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    assert reads == [3]
    assert main(args) == 0 and "2 already done" in capsys.readouterr().out
    assert reads == [3, 3]  # the second run: once again, and the prepared graph came from the cache


def test_resume_retries_failed_files_and_counts_only_files_still_there(model_cache_dir, tmp_path, capsys, random_models):
    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        _image((40, 30), "RGB", i).save(root / f"ok{i}.png")
    (root / "late.png").write_bytes(b"")  # still being copied
    out = tmp_path / "r.parquet"
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    assert "images: 4 (1 errors)" in capsys.readouterr().out
    _image((40, 30), "RGB", 7).save(root / "late.png")  # the copy finished
    (root / "ok0.png").unlink()
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    text = capsys.readouterr().out
    assert "images: 1 (0 errors), 2 already done from an earlier run, 1 that failed then tried again" in text
    assert f"kept: 1 rows of an earlier run whose files were not found under {root} this time" in text
    df = pl.read_parquet(out).sort("path")
    assert df.height == 4 and df["error"].null_count() == 4  # the old error row was replaced


def test_an_output_named_like_an_image_in_the_input_folder_is_not_an_input(model_cache_dir, tmp_path, capsys,
                                                                            random_models):
    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    for i in range(2):
        _image((40, 30), "RGB", i).save(root / f"{i}.png")
    for out in (root / "results.png", root / "link.png"):  # the second a symlink to a file elsewhere
        if out.name == "link.png":
            out.symlink_to(tmp_path / "elsewhere.parquet")
        for _ in range(2):
            assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
        assert "images: 0 (0 errors), 2 already done from an earlier run" in capsys.readouterr().out
        df = pl.read_parquet(out)
        assert sorted(Path(p).name for p in df["path"]) == ["0.png", "1.png"] and df["error"].null_count() == 2
        if out.name == "results.png":
            out.unlink()


def test_an_empty_folder_says_no_images_were_found(model_cache_dir, tmp_path, capsys, random_models):
    random_models["gender/alpha"]
    (tmp_path / "empty").mkdir()
    assert main(_gender_args(tmp_path / "empty", tmp_path / "e.parquet", model_cache_dir, "--random-weights")) == 0
    assert f"WARNING: no images found under {tmp_path / 'empty'}" in capsys.readouterr().out
    assert pl.read_parquet(tmp_path / "e.parquet").height == 0


def test_threads_far_above_the_cores_are_lowered_with_a_warning(model_cache_dir, tmp_path, caplog, random_models,
                                                               monkeypatch):
    import engine.runner as runner

    random_models["gender/alpha"]
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    root = tmp_path / "in"
    root.mkdir()
    _image((40, 30), "RGB", 0).save(root / "a.png")
    with caplog.at_level(logging.WARNING, logger="engine.runner"):
        assert main(_gender_args(root, tmp_path / "t.parquet", model_cache_dir, "--random-weights",
                                 "--threads", "1000")) == 0
    assert "--threads 1000 is more than 4 times the 2 CPU cores here; using 8" in caplog.text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", ""], "must name a file"),
        (["--out", "results.CSV"], "written as parquet, not CSV; name it results.parquet"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--calib-count", "0"], "--calib-count must be at least 1"),
        (["--spec-file", "__PNG__"], "is not UTF-8 text"),
    ],
)
def test_more_user_errors_are_one_line(extra, message, folder, tmp_path, capsys):
    extra = [str(folder / "frames" / "f1.png") if e == "__PNG__" else e for e in extra]
    code = main(["run", str(folder / "heads"), "--random-weights", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.parquet"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("engine: error:") and message in err and "\n" not in err


def test_a_run_reads_each_models_onnx_hash_once(folder, tmp_path, capsys, monkeypatch):
    """The run record, the prepared fp16 graph's cache key and (on a GPU) the engine
    lookup name the model by one reading of its hash; preparing the graph reads it once
    more, after, to refuse a file replaced meanwhile. A reused graph needs no second."""
    import builders.manifest
    import builders.precision
    from builders.export import META_OUTPUT_KIND
    from tests.model_fixtures import make_tiny_classifier

    user = make_tiny_classifier(tmp_path / "user.onnx", size=224, classes=2, metadata={META_OUTPUT_KIND: "logits"})
    calls = []
    real = builders.manifest.onnx_sha256

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(builders.manifest, "onnx_sha256", counting)
    monkeypatch.setattr(builders.precision, "onnx_sha256", counting)
    out = tmp_path / "h.parquet"
    args = _gender_args(folder / "heads", out, tmp_path / "cache", "--gender-onnx", str(user), "--precision", "fp16")
    assert main(args) == 0
    assert calls == ["user.onnx", "user.onnx"]
    capsys.readouterr()
    calls.clear()
    assert main(args) == 0  # resumed: the record is compared, the prepared graph reused
    assert calls == ["user.onnx"] and "already done" in capsys.readouterr().out


def test_an_error_row_inside_a_batch_does_not_shift_the_others():
    """A batch [good, bad, good, good]: the model's rows are those of the files that
    decoded (ok = [0, 2, 3]); each good file gets its own row's probabilities, label and
    size, the bad one only its cause."""
    from types import SimpleNamespace

    from engine.models import WeightsKind
    from engine.postprocess import classify
    from engine.preprocess import PreprocessResult
    from engine.runner import _Batch, _rows, result_schema
    from engine.specs import OutputKind, SpecRegistry

    model = SimpleNamespace(spec=SpecRegistry.builtin().get("gender"), weights=WeightsKind.RANDOM)
    schema = result_schema([model])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    res = PreprocessResult(ok=[0, 2, 3], views={}, sizes=[(10, 20), (30, 40), (50, 60)], errors={1: "empty file (0 bytes)"})
    batch = _Batch(["/d/a.png", "/d/b.png", "/d/c.png", "/d/d.png"], None, {}, res)
    df = _rows(batch, [model], {"gender/alpha": classify(probs, OutputKind.PROBABILITIES, ("female", "male"), "g")}, schema)
    assert df["path"].to_list() == batch.paths
    assert df["error"].to_list() == [None, "empty file (0 bytes)", None, None]
    assert df["gender_label"].to_list() == ["female", None, "male", "female"]
    np.testing.assert_allclose(df["gender_p_male"].to_numpy(), [0.1, np.nan, 0.8, 0.4], equal_nan=True)
    assert df["height"].to_list() == [10, None, 30, 50] and df["width"].to_list() == [20, None, 40, 60]


def test_an_error_row_whose_file_is_gone_is_counted_as_kept(model_cache_dir, tmp_path, capsys, random_models):
    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    _image((40, 30), "RGB", 0).save(root / "ok.png")
    (root / "bad.png").write_bytes(b"")
    out = tmp_path / "r.parquet"
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    (root / "bad.png").unlink()  # the file that failed is gone; its error row stays
    capsys.readouterr()
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    text = capsys.readouterr().out
    assert "images: 0 (0 errors), 1 already done from an earlier run" in text
    assert f"kept: 1 rows of an earlier run whose files were not found under {root} this time" in text
    assert pl.read_parquet(out).height == 2


def test_an_input_that_only_shares_the_outputs_name_is_classified(model_cache_dir, tmp_path, random_models):
    """--out elsewhere/same.png is not the input folder's same.png: only the output
    itself (or a link to it) is left out."""
    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    for i, name in enumerate(("same.png", "other.png")):
        _image((40, 30), "RGB", i).save(root / name)
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "elsewhere" / "same.png"
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    df = pl.read_parquet(out)
    assert sorted(Path(p).name for p in df["path"]) == ["other.png", "same.png"] and df["error"].null_count() == 2


def test_a_fully_resumed_run_does_not_warn_that_no_images_were_found(model_cache_dir, tmp_path, capsys, random_models):
    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    _image((40, 30), "RGB", 0).save(root / "a.png")
    out = tmp_path / "r.parquet"
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    capsys.readouterr()
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    text = capsys.readouterr().out
    assert "images: 0 (0 errors), 1 already done from an earlier run" in text
    assert "no images found" not in text


def test_flush_every_one_writes_a_part_per_row(model_cache_dir, tmp_path, random_models):
    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        _image((40, 30), "RGB", i).save(root / f"{i}.png")
    out = tmp_path / "r.parquet"
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights", "--flush-every", "1")) == 0
    assert pl.read_parquet(out).height == 3 and not (tmp_path / "r.parquet.parts").exists()


def test_a_run_whose_results_cannot_be_written_stops_with_one_line_and_resumes(model_cache_dir, tmp_path, capsys,
                                                                                random_models):
    """A part the system refuses to write (here a file-size limit; a full disk alike)
    ends the run with one line naming what is kept, and the same command, rerun, resumes."""
    from tests.file_limit import run_module_under_file_size_limit

    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (40 * i, 90, 200)).save(root / f"{i}.png")
    out = tmp_path / "r.parquet"
    args = _gender_args(root, out, model_cache_dir, "--random-weights", "--batch-size", "2", "--flush-every", "2")
    # every part is larger than 1000 bytes; the limit starts with the reader thread, once
    # DALI has written its generated pipeline code to a temp file
    r = run_module_under_file_size_limit("engine", args, 1000, from_call="engine.runner:FileReader.start")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"engine: error: cannot write {out}.parts/part-000001.parquet: File too large." in r.stderr
    assert not out.exists() and not (tmp_path / "r.parquet.lock").exists()
    assert main(_gender_args(root, out, model_cache_dir, "--random-weights")) == 0
    assert sorted(pl.read_parquet(out)["path"].to_list()) == [str(root / f"{i}.png") for i in range(6)]


@pytest.mark.slow
def test_no_room_for_the_models_export_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """The first run exports the random-weight resnet18 (about 45 MB) into an empty cache;
    a file-size limit of 1 MB refuses that write as a full disk would. One line naming the
    file, no partial file in the cache, and the same command without the limit runs."""
    from tests.file_limit import run_module_under_file_size_limit

    pytest.importorskip("torch")  # the export
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (40, 30), (40, 90, 200)).save(root / "a.png")
    out, cache = tmp_path / "r.parquet", tmp_path / "cache"
    args = _gender_args(root, out, cache, "--random-weights", "--no-download")
    r = run_module_under_file_size_limit("engine", args, 1_000_000)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"engine: error: cannot write {re.escape(str(cache))}/exports/resnet18-\S+\.onnx: File too large",
                        last), last
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    assert not out.exists() and not (tmp_path / "r.parquet.lock").exists()
    assert main(args) == 0
    assert pl.read_parquet(out)["error"].to_list() == [None]


def test_no_room_for_dalis_generated_code_is_one_line(model_cache_dir, tmp_path, random_models):
    """DALI writes the pipeline's compiled `if` to a temp file; with no room for it DALI
    ran the function as is and failed on a DataNode in a TypeError. One line instead."""
    from tests.file_limit import run_module_under_file_size_limit

    random_models["gender/alpha"]
    root = tmp_path / "in"
    root.mkdir()
    Image.new("RGB", (40, 30), (40, 90, 200)).save(root / "a.png")
    out = tmp_path / "r.parquet"
    r = run_module_under_file_size_limit("engine", _gender_args(root, out, model_cache_dir, "--random-weights"), 1000)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("engine: error: DALI cannot write its generated pipeline code to the temp folder ")
    assert last.endswith(": File too large: make room and run the command again (or set TMPDIR to a folder with room)")
    assert not out.exists() and not (tmp_path / "r.parquet.lock").exists()
