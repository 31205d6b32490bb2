"""`engine run` on users' own ONNX files of unusual make: tiny hand-built graphs, each
with one trait a published or home-made export can have (a pinned batch, external
weights, float16 input, a graph that mixes or drops rows, outputs that are not what
they are declared to be). Each must either run right or stop with one line that says
what is wrong (and, where it matters, which files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import polars as pl
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from engine.cli import main

LOGITS = {"engine.output_kind": "logits"}


def tiny(path: Path, *, in_shape=("batch", 3, 224, 224), out_shape=("batch", 2), reshape_batch=None,
         in_dtype=TensorProto.FLOAT, post=None, meta=None, ext=False, seed=0, w=None, b=None) -> Path:
    """GlobalAveragePool -> flatten -> Gemm (-> ``post`` nodes) classifier of 224 px."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    if in_dtype == TensorProto.FLOAT16:
        nodes.append(helper.make_node("Cast", [x], ["x32"], to=TensorProto.FLOAT))
        x = "x32"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    if reshape_batch is not None:  # the batch baked into the graph
        inits.append(numpy_helper.from_array(np.array([reshape_batch, -1], np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]))
    else:
        nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    weights = w if w is not None else rng.standard_normal((2, 3)).astype(np.float32) * 5
    bias = b if b is not None else rng.standard_normal(2).astype(np.float32)
    inits += [numpy_helper.from_array(np.asarray(weights, np.float32), "fc_w"),
              numpy_helper.from_array(np.asarray(bias, np.float32), "fc_b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    y = "logits"
    if post is not None:
        extra, extra_inits, y = post(y)
        nodes += extra
        inits += extra_inits
    nodes.append(helper.make_node("Identity", [y], ["output"]))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", in_dtype, list(in_shape))],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta:
        helper.set_model_props(model, dict(meta))
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, value in (("black.png", 0), ("grey.png", 128), ("white.png", 255)):
        Image.new("RGB", (60, 40), (value, value, value)).save(root / name)
    return root


def _run(images, out, onnx_path, *extra):
    return main(["run", str(images), "--out", str(out), "--only", "gender", "--gender-onnx", str(onnx_path),
                 "--cache-dir", str(out.parent / "cache"), "--no-progress", *extra])


def _probs(out) -> np.ndarray:
    return pl.read_parquet(out).sort("path")["gender_p_female"].to_numpy()


def test_new_external_weights_of_a_pinned_batch_model_are_not_served_from_the_old_copy(images, tmp_path):
    """A batch-1 model is run through a dynamic-batch copy in the cache; replacing only
    its weights file must make a new copy (and a resume into the old output is refused)."""
    model = tiny(tmp_path / "m" / "fixed.onnx", in_shape=(1, 3, 224, 224), out_shape=(1, 2), meta=LOGITS, ext=True)
    assert _run(images, tmp_path / "a.parquet", model) == 0
    other = tiny(tmp_path / "other" / "fixed.onnx", in_shape=(1, 3, 224, 224), out_shape=(1, 2), meta=LOGITS,
                 ext=True, seed=1)
    data = model.with_name("fixed.onnx.data")
    assert data.stat().st_size == other.with_name("fixed.onnx.data").stat().st_size
    data.write_bytes(other.with_name("fixed.onnx.data").read_bytes())  # the same .onnx, other weights beside it
    assert _run(images, tmp_path / "b.parquet", model) == 0
    assert not np.allclose(_probs(tmp_path / "a.parquet"), _probs(tmp_path / "b.parquet"))
    assert _run(images, tmp_path / "a.parquet", model) == 2  # another model: not resumed into a


def _pooled_over_the_batch(y):
    return [helper.make_node("ReduceMean", [y], ["pooled_rows"], axes=[0], keepdims=1)], [], "pooled_rows"


def test_onnx_runtime_refuses_an_output_without_one_row_per_image(tmp_path):
    """The safety net behind the batching check of resolve_model: a graph that pools,
    drops or adds rows is refused at run time instead of handing rows to wrong files."""
    from engine.backends.base import TensorDecl
    from engine.backends.onnxruntime import OrtBackend
    from engine.errors import ModelError

    model = tiny(tmp_path / "pools.onnx", post=_pooled_over_the_batch)
    decls = TensorDecl("input", (None, 3, 224, 224), np.dtype(np.float32)), TensorDecl("output", (None, 2), np.dtype(np.float32))
    with OrtBackend(model, *decls) as backend:
        assert backend.run(np.zeros((1, 3, 224, 224), np.float32)).shape == (1, 2)
        with pytest.raises(ModelError, match=r"has shape \(1, 2\) for a batch of 3; expected \(3, 2\).*one row per image"):
            backend.run(np.zeros((3, 3, 224, 224), np.float32))


def test_an_onnx_runtime_failure_is_one_line(images, tmp_path, capfd):
    # declared dynamic, the batch baked in at 2: runs at no batch the engine can give it
    model = tiny(tmp_path / "baked2.onnx", reshape_batch=2, meta=LOGITS)
    assert _run(images, tmp_path / "baked.parquet", model, "--batch-size", "2") == 2
    err = capfd.readouterr().err  # file descriptor 2: ONNX Runtime logs there itself, not through Python
    assert "ONNX Runtime failed on a batch of 1" in err and "Traceback" not in err
    assert "[E:onnxruntime" not in err  # its own log of the failed run would say it all again
    (line,) = [ln for ln in err.splitlines() if ln.startswith("engine: error: ")]
    assert "Reshape node" in line and "cannot be reshaped" in line  # ONNX Runtime's own reason, cut to 300


def test_a_graph_that_fails_in_the_agreement_check_is_one_line(tmp_path, capfd):
    """builders.precision.run_cpu (the FP32-agreement check of a prepared graph) on a
    graph ONNX Runtime cannot run: a ModelError with ORT's reason, no ORT log of its own."""
    from builders.precision import run_cpu
    from engine.errors import ModelError

    model = tiny(tmp_path / "baked2.onnx", reshape_batch=2)
    with pytest.raises(ModelError, match=r"baked2\.onnx: ONNX Runtime failed on a batch of 1: .*cannot be reshaped"):
        run_cpu(model, np.zeros((1, 3, 224, 224), np.float32))
    assert "[E:onnxruntime" not in capfd.readouterr().err


def test_a_file_onnx_runtime_cannot_open_is_one_line_with_the_reason_at_its_end(images, tmp_path, capfd):
    """ONNX Runtime's refusal of an opset it does not support is one long line: its start
    is a C++ source location and signature, its end what ORT supports. The error keeps
    the end, for `engine run` and for the CPU session of `engine build`'s checks."""
    from builders.precision import cpu_session
    from engine.errors import ModelError

    model = tiny(tmp_path / "opset99.onnx", meta=LOGITS)
    proto = onnx.load(str(model))
    proto.opset_import[0].version = 99
    onnx.save(proto, str(model))
    assert _run(images, tmp_path / "opset.parquet", model) == 2
    (line,) = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("engine: error: ")]
    assert "ONNX Runtime cannot load" in line and "opset99.onnx" in line
    assert "Current official support for domain ai.onnx is till opset" in line and " ... " in line
    with pytest.raises(ModelError, match=r"cannot load .*opset99\.onnx: .* \.\.\. .*official support") as caught:
        cpu_session(model)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300 + len(str(model)) + 40


def test_onnx_runtime_reasons_are_one_line_with_their_start_and_end():
    from builders.onnx_io import ort_reason

    assert ort_reason(RuntimeError("[ONNXRuntimeError] : 1 : FAIL :\n  bad\tinput \n")) == \
        "[ONNXRuntimeError] : 1 : FAIL : bad input"
    assert ort_reason(RuntimeError("")) == "RuntimeError"
    start, middle, end = "Reshape node. Name:'' Status Message: ", "reshape_helper.h:84 signature " * 20, \
        "The input tensor cannot be reshaped"
    got = ort_reason(RuntimeError(start + middle + end), limit=120)
    assert len(got) <= 120 and got.startswith(start) and got.endswith(end) and " ... " in got
    assert ort_reason(RuntimeError("x" * 120), limit=120) == "x" * 120


def _reverse_rows(y):
    starts, ends, axes, steps = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in
                                 ((-1, "starts"), (-(2**62), "ends"), (0, "axes"), (-1, "steps")))
    return [helper.make_node("Slice", [y, "starts", "ends", "axes", "steps"], ["reversed"])], \
        [starts, ends, axes, steps], "reversed"


@pytest.mark.parametrize("trait", ["batch baked in at 1", "rows reversed", "rows pooled"])
def test_a_graph_declared_dynamic_that_does_not_batch_cleanly_runs_one_image_at_a_time(images, tmp_path, caplog,
                                                                                      trait):
    kw = {"batch baked in at 1": {"reshape_batch": 1}, "rows reversed": {"post": _reverse_rows},
          "rows pooled": {"post": _pooled_over_the_batch}}[trait]
    model = tiny(tmp_path / "odd.onnx", meta=LOGITS, **kw)
    plain = tiny(tmp_path / "plain.onnx", meta=LOGITS)  # the same weights, batching cleanly
    assert _run(images, tmp_path / "odd.parquet", model, "--batch-size", "3") == 0
    assert "it runs one image at a time" in caplog.text
    caplog.clear()
    assert _run(images, tmp_path / "plain.parquet", plain, "--batch-size", "3") == 0
    assert "one image at a time" not in caplog.text
    np.testing.assert_allclose(_probs(tmp_path / "odd.parquet"), _probs(tmp_path / "plain.parquet"), rtol=1e-5)
    assert len(list((tmp_path / "cache" / "batching").glob("*.one-at-a-time"))) == 1  # checked once per file


def _centred_over_the_batch(y):  # each row minus the batch's mean row: rows mix, shape kept
    return [helper.make_node("ReduceMean", [y], ["mean_row"], axes=[0], keepdims=1),
            helper.make_node("Sub", [y, "mean_row"], ["centred"])], [], "centred"


def test_a_graph_pinned_at_batch_2_that_mixes_rows_runs_one_image_at_a_time(images, tmp_path, caplog):
    """Made dynamic from a fixed batch of 2, the copy matches the original at batch 2 (it
    mixes its rows alike), so that check proves nothing: the copy gets the batching check
    of any dynamic graph."""
    model = tiny(tmp_path / "mix2.onnx", in_shape=(2, 3, 224, 224), out_shape=(2, 2), post=_centred_over_the_batch,
                 meta=LOGITS)
    assert _run(images, tmp_path / "m.parquet", model, "--batch-size", "3") == 0
    assert "it runs one image at a time" in caplog.text
    np.testing.assert_allclose(_probs(tmp_path / "m.parquet"), 0.5, atol=1e-6)  # one row alone: centred to zero


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_model_pinned_to_a_batch_it_cannot_leave_prepares_with_calibration(images, tmp_path, precision):
    """fp16's agreement check and int8's calibration feed the graph at its own batch."""
    model = tiny(tmp_path / "pinned.onnx", in_shape=(4, 3, 224, 224), out_shape=(4, 2), reshape_batch=4, meta=LOGITS)
    out = tmp_path / f"{precision}.parquet"
    assert _run(images, out, model, "--precision", precision, "--calib", str(images)) == 0
    assert _run(images, tmp_path / "fp32.parquet", model) == 0
    np.testing.assert_allclose(_probs(out), _probs(tmp_path / "fp32.parquet"), atol=0.05)


def test_a_float16_input_model_prepares_at_fp16_with_calibration(images, tmp_path):
    model = tiny(tmp_path / "half.onnx", in_dtype=TensorProto.FLOAT16, meta=LOGITS)
    assert _run(images, tmp_path / "h.parquet", model, "--precision", "fp16", "--calib", str(images)) == 0
    assert pl.read_parquet(tmp_path / "h.parquet")["error"].null_count() == 3


def test_nan_for_some_images_names_them(images, tmp_path, capsys):
    """sqrt of (brightness - 2): NaN for the black and grey images only."""
    def root(y):
        return [helper.make_node("Sqrt", [y], ["rooted"])], [], "rooted"

    model = tiny(tmp_path / "nan.onnx", post=root, meta=LOGITS, w=np.ones((2, 3)), b=[-2.0, -2.0])
    assert _run(images, tmp_path / "n.parquet", model, "--batch-size", "3") == 2
    err = capsys.readouterr().err
    assert "NaN or infinity for 2 of 3 image(s)" in err
    assert "black.png" in err and "grey.png" in err and "white.png" not in err


def test_negative_probabilities_are_named_as_such(images, tmp_path, capsys):
    def stretched(y):  # 3 * softmax - 1: rows still sum to 1
        three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
        one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
        nodes = [helper.make_node("Softmax", [y], ["sm"], axis=1), helper.make_node("Mul", ["sm", "three"], ["sm3"]),
                 helper.make_node("Sub", ["sm3", "one"], ["stretched"])]
        return nodes, [three, one], "stretched"

    model = tiny(tmp_path / "neg.onnx", post=stretched, w=np.array([[5, 5, 5], [-5, -5, -5]]), b=[0, 0])
    assert _run(images, tmp_path / "g.parquet", model) == 2
    err = capsys.readouterr().err
    assert "declared to output probabilities, but it gives negative values" in err
    assert "engine.output_kind" in err  # the metadata, which wins over a spec file, is named too


def test_a_folder_given_as_the_onnx_says_so(images, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    assert _run(images, tmp_path / "x.parquet", tmp_path / "models") == 2
    assert "is a folder; name the .onnx file in it" in capsys.readouterr().err


def test_a_softmaxed_output_declared_as_logits_is_warned_about(images, tmp_path, caplog, monkeypatch):
    import engine.postprocess

    monkeypatch.setattr(engine.postprocess, "_warned_softmaxed", set())  # once per process: start afresh

    def softmaxed(y):
        return [helper.make_node("Softmax", [y], ["sm"], axis=1)], [], "sm"

    model = tiny(tmp_path / "sm.onnx", post=softmaxed, meta=LOGITS)
    assert _run(images, tmp_path / "s.parquet", model, "--batch-size", "3") == 0
    assert "every row is already a probability vector" in caplog.text
    caplog.clear()
    assert _run(images, tmp_path / "l.parquet", tiny(tmp_path / "l.onnx", meta=LOGITS), "--batch-size", "3") == 0
    assert "already a probability vector" not in caplog.text


@pytest.mark.parametrize("trait", ["declared batch of 1", "batch baked in at 1"])
def test_a_model_that_runs_one_image_at_a_time_streams_frames_in_pieces(tmp_path, trait):
    """The streamed loop (here on the host device) takes a --batch-size batch and runs a
    model pinned to batch 1 a row at a time, as the plain path does; it used to refuse."""
    from engine.frames import FrameClassifier
    from engine.models import ModelSource, resolve_model
    from engine.specs import SpecRegistry

    kw = {"declared batch of 1": {"in_shape": (1, 3, 224, 224), "out_shape": (1, 2), "reshape_batch": 1},
          "batch baked in at 1": {"reshape_batch": 1}}[trait]
    onnx_path = tiny(tmp_path / "one.onnx", meta=LOGITS, **kw)
    model = resolve_model(SpecRegistry.builtin().get("gender"), ModelSource(onnx=onnx_path), tmp_path / "cache")
    assert model.info.input.fixed_batch == 1
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (40 + 7 * k, 60, 3), np.uint8) for k in range(7)]
    results = {}
    for streamed in (False, True):
        with FrameClassifier([model], batch_size=4, streamed=streamed, threads=1, cache_dir=tmp_path / "cache") as fc:
            results[streamed] = fc.classify(frames)[model.spec.key]
    np.testing.assert_allclose(results[True].probabilities, results[False].probabilities, rtol=1e-6, atol=1e-7)
    assert results[True].labels == results[False].labels


def test_engine_build_refuses_a_batch_profile_a_fixed_batch_model_cannot_run(tmp_path, capsys):
    """Checked before any preparation; without --gender-profile the build takes 1,1,1."""
    model = tiny(tmp_path / "odd.onnx", meta=LOGITS, reshape_batch=1)  # declared dynamic, batch baked in at 1
    code = main(["build", "--precision", "fp16", "--only", "gender", "--gender-onnx", str(model),
                 "--gender-profile", "1,8,16", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "runs a fixed batch of 1, so its engine's batch profile is 1,1,1, not 1,8,16" in err
    assert not (tmp_path / "cache" / "prepared").exists()


def test_the_suggested_build_command_leaves_a_fixed_batch_models_profile_to_engine_build(tmp_path):
    """No engine cached: the run's message names the build command; at --batch-size 512
    (outside the default profile) it asks for a profile for a model that batches, and
    none for one that runs a batch of 1, which `engine build` gives 1,1,1."""
    from builders.manifest import BuildTarget
    from engine.gpu_path import find_engines
    from engine.models import ModelChoice, ModelSource, resolve_model
    from engine.runner import RunConfig
    from engine.specs import SpecRegistry, Task

    target = BuildTarget(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="11.4.0.1")
    spec = SpecRegistry.builtin().get("gender")
    suggested = {}
    for name, kw in (("plain", {}), ("odd", {"reshape_batch": 1})):
        choice = ModelChoice(Task.GENDER, None, ModelSource(onnx=tiny(tmp_path / f"{name}.onnx", meta=LOGITS, **kw)))
        config = RunConfig(input=tmp_path, out=tmp_path / "o.parquet", models=(choice,), batch_size=512,
                           cache_dir=tmp_path / "cache", progress=False)
        model = resolve_model(spec, choice.source, config.cache_dir)
        found, problem = find_engines([model], [choice], config, "fp16", target)
        assert found == {} and "build it with: engine build" in problem
        suggested[name] = problem
    assert "--gender-profile 1,512,512" in suggested["plain"]
    assert "--gender-profile" not in suggested["odd"]
