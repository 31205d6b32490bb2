"""Precision preparation on the real architectures (random weights), checked on the CPU.

The calibration images are the repository's example frames and head crops (plus a
broken file that must be skipped), preprocessed by the models' own DALI pipeline.
Agreement bounds are tight enough to fail: FP16 or INT8 graphs that lost precision
(FP16 LayerNorm/Softmax, quantised logits, asymmetric or per-tensor weights) would not
meet them on these models.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.calibration import (
    DEFAULT_CALIBRATION_IMAGES,
    CalibrationImages,
    CalibrationSet,
    calibration_set_sha256,
    find_calibration_images,
    load_calibration_set,
)
from builders.precision import (
    FP32_OPS,
    AgreementBounds,
    Precision,
    compare_outputs,
    measure_cpu_speed,
    prepare,
    run_cpu,
    topological_sort,
)
from engine.errors import InputError, ModelError
from engine.specs import OutputKind, SpecRegistry

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(scope="module")
def calib_paths() -> list[Path]:
    if not EXAMPLES.is_dir():
        pytest.skip(f"example images missing ({EXAMPLES})")
    return find_calibration_images(EXAMPLES)


@pytest.fixture(scope="module")
def gender(random_models):
    return random_models["gender/alpha"]


@pytest.fixture(scope="module")
def gender_calib(gender, calib_paths) -> CalibrationSet:
    return load_calibration_set(calib_paths, gender.spec, batch_size=4)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _io_types(model: onnx.ModelProto) -> set[int]:
    return {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]})
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


# --------------------------------------------------------------------------- calibration set


def test_calibration_folder_selection(tmp_path, calib_paths):
    assert len(calib_paths) == 7  # six images and broken.jpg
    many = tmp_path / "frames"
    for ep in ("ep01", "ep02"):
        (many / ep).mkdir(parents=True)
        for i in range(10):
            shutil.copy(EXAMPLES / "frame_0002.jpg", many / ep / f"f{i:03d}.jpg")
    (many / "notes.txt").write_text("not an image")
    picked = find_calibration_images(many, limit=4)
    assert len(picked) == 4
    assert {p.parent.name for p in picked} == {"ep01", "ep02"}  # spread over the folder
    assert picked == find_calibration_images(many, limit=4)  # deterministic
    assert DEFAULT_CALIBRATION_IMAGES >= 32
    with pytest.raises(InputError, match="does not exist"):
        find_calibration_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        find_calibration_images(tmp_path / "empty")
    # as `engine run` finds images: a symlinked folder is followed, a loop skipped, and a
    # file reached by two paths counts once
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "ep03").symlink_to(many / "ep01", target_is_directory=True)
    (linked / "ep04").symlink_to(many / "ep01", target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)
    assert [p.name for p in find_calibration_images(linked)] == [f"f{i:03d}.jpg" for i in range(10)]


def test_calibration_set_uses_the_model_pipeline_and_skips_broken_files(gender, gender_calib, calib_paths):
    size = gender.spec.preprocess.size
    assert gender_calib.tensors.shape == (6, 3, size, size)
    assert gender_calib.tensors.dtype == np.float32
    assert any("broken.jpg" in s for s in gender_calib.skipped)
    # gender spec: /255 and no mean/std, so values stay in [0, 1]; quality would be ImageNet-normalised
    assert 0.0 <= gender_calib.tensors.min() and gender_calib.tensors.max() <= 1.0
    assert gender_calib.tensors.std() > 0.05  # real image content, not a constant


def test_gif_and_tiff_calibrate_as_engine_run_reads_them(tmp_path, gender):
    from PIL import Image

    rng = np.random.default_rng(5)
    for name in ("a.gif", "b.tif", "c.tiff"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / name)
    found = find_calibration_images(tmp_path)
    assert [p.name for p in found] == ["a.gif", "b.tif", "c.tiff"]
    calib = load_calibration_set(found, gender.spec)
    assert calib.tensors.shape[0] == 3 and not calib.skipped


def test_calibration_set_with_no_usable_image(tmp_path, gender):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="none of the 1 calibration images"):
        load_calibration_set([bad], gender.spec)


def test_calibration_set_hash_names_the_bytes_its_tensors_came_from(tmp_path, gender):
    from PIL import Image

    rng = np.random.default_rng(6)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"broken")
    images = CalibrationImages(find_calibration_images(tmp_path))
    assert load_calibration_set(images, gender.spec).sha256 == calibration_set_sha256(images[:2])
    whole = CalibrationImages(images[:2])
    assert load_calibration_set(whole, gender.spec).sha256 == whole.sha256

    # The run record took the set's hash; an image rewritten before the tensors are read
    # would make tensors that no record names.
    recorded = whole.sha256
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="changed while they were being read"):
        load_calibration_set(whole, gender.spec)
    assert whole.sha256 == recorded
    assert load_calibration_set(CalibrationImages(images[:2]), gender.spec).sha256 != recorded


# --------------------------------------------------------------------------- graph passes and metrics


def test_topological_sort_restores_order():
    nodes = [
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Neg", ["x"], ["a"], name="first"),
        helper.make_node("Add", ["b", "a"], ["y"], name="third"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    topological_sort(model)
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["first", "second", "third"]


def test_compare_outputs_metrics_and_bounds():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 4)).astype(np.float32) * 3
    same = compare_outputs(logits, logits.copy(), OutputKind.LOGITS)
    assert same.argmax_agreement == 1.0 and same.max_abs_dp == 0.0 and same.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert same.softmax_applied

    flipped = logits.copy()
    flipped[0] = flipped[0][::-1]  # reverse one image's class order
    worse = compare_outputs(logits, flipped, OutputKind.LOGITS)
    assert worse.argmax_agreement == pytest.approx(15 / 16)
    assert worse.max_abs_dp > 0.1 and worse.mean_kl > 1e-3
    assert len(worse.violations(AgreementBounds.default(Precision.FP16))) == 3

    broken = logits.copy()
    broken[3, 1] = np.nan
    bad = compare_outputs(logits, broken, OutputKind.LOGITS)
    assert bad.nonfinite == 1 and bad.argmax_agreement < 1.0
    assert "NaN/Inf" in bad.violations(AgreementBounds.default(Precision.INT8))[0]

    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    on_probs = compare_outputs(probs, probs, OutputKind.PROBABILITIES)
    assert not on_probs.softmax_applied
    # declared probabilities that are not: compared after a softmax, and said so
    assert compare_outputs(logits, logits, OutputKind.PROBABILITIES).softmax_applied


# --------------------------------------------------------------------------- ResNet-18 (gender)


@pytest.fixture(scope="module")
def gender_fp16(gender, gender_calib, prepared_dir):
    return prepare(gender.onnx_path, gender.spec, Precision.FP16, None, prepared_dir, calib=gender_calib)


@pytest.fixture(scope="module")
def gender_int8(gender, gender_calib, prepared_dir):
    return prepare(gender.onnx_path, gender.spec, Precision.INT8, None, prepared_dir, calib=gender_calib)


def test_a_source_replaced_after_its_hash_was_read_is_not_cached_under_that_hash(tmp_path):
    """The run reads the model's hash once (ResolvedModel.source_sha256) and prepares
    later; if the file was replaced in between, the graph made from the new content
    must not be cached under the old hash, where a later run of the old file finds it."""
    from builders.manifest import onnx_sha256
    from tests.model_fixtures import make_tiny_classifier

    spec = SpecRegistry.builtin().get("gender")
    a = make_tiny_classifier(tmp_path / "a.onnx", size=224, classes=2, seed=0)
    b = make_tiny_classifier(tmp_path / "b.onnx", size=224, classes=2, seed=1)
    user = tmp_path / "user.onnx"
    shutil.copy(a, user)
    read_before = onnx_sha256(user)
    shutil.copy(b, user)  # replaced mid-run
    with pytest.raises(ModelError, match="changed while it was being prepared"):
        prepare(user, spec, "fp16", None, tmp_path / "prepared", output_kind=OutputKind.LOGITS,
                source_sha256=read_before)
    assert list((tmp_path / "prepared").glob("*.onnx")) == []
    shutil.copy(a, user)
    prepared = prepare(user, spec, "fp16", None, tmp_path / "prepared", output_kind=OutputKind.LOGITS)
    assert not prepared.from_cache and prepared.source_sha256 == read_before
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(prepared.path)).graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(a)).graph.initializer}
    np.testing.assert_allclose(weights["fc_w"].astype(np.float32), original["fc_w"], rtol=1e-3)


def test_fp32_is_the_model_as_is(gender, prepared_dir):
    prepared = prepare(gender.onnx_path, gender.spec, "fp32", None, prepared_dir)
    assert prepared.path == gender.onnx_path and prepared.agreement is None
    assert prepared.sha256 == prepared.source_sha256


def test_fp16_resnet18_graph_and_agreement(gender_fp16):
    model = onnx.load(str(gender_fp16.path))
    assert _io_types(model) == {TensorProto.FLOAT}  # FP32 I/O
    types = _value_types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)
    pools = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert pools and all(types[n.input[0]] == TensorProto.FLOAT for n in pools)  # reductions stay FP32

    a = gender_fp16.agreement
    assert a is not None and a.images == 6 and a.nonfinite == 0
    assert a.argmax_agreement == 1.0
    assert a.max_abs_dp < 2e-3
    assert a.mean_kl < 1e-5
    assert not a.violations(AgreementBounds.default(Precision.FP16))


def _check_int8_graph(model: onnx.ModelProto) -> None:
    inits = _initializers(model)
    producers = _producers(model)
    quantised = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert quantised
    weight_ops = 0
    for node in quantised:
        for name in node.input[:2]:
            if name in inits:
                pytest.fail(f"{node.op_type} {node.name} still has a float weight {name}")
            dq = producers[name]
            assert dq.op_type == "DequantizeLinear", f"{node.name} input {name} is not dequantised"
            if dq.input[0] in inits:  # a weight: int8, per-channel over the output channels
                weight_ops += 1
                q = numpy_helper.to_array(inits[dq.input[0]])
                scale = numpy_helper.to_array(inits[dq.input[1]])
                assert q.dtype == np.int8
                assert scale.ndim == 1 and scale.size > 1 or q.shape[0] == 1
            zero_point = numpy_helper.to_array(inits[dq.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric
        if len(node.input) > 2 and node.input[2]:  # bias left unquantised
            assert node.input[2] in inits and inits[node.input[2]].data_type != TensorProto.INT32
    assert weight_ops >= len([n for n in quantised if n.op_type != "MatMul"])
    # outputs of the quantised ops are not re-quantised for their own sake: a Q/DQ on one
    # only appears as the input of another quantised op; the logits stay in float
    quantised_outputs = {o for n in quantised for o in n.output}
    q_to_dq = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in quantised_outputs:
            dq_outs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]}
            users = [n for n in model.graph.node if set(n.input) & dq_outs]
            assert users and all(u.op_type in ("Conv", "MatMul", "Gemm") for u in users), node.name
    tensor = model.graph.output[0].name
    while tensor in producers and producers[tensor].op_type == "Cast":
        tensor = producers[tensor].input[0]
    assert producers[tensor].op_type in ("Gemm", "MatMul", "Add", "Softmax"), producers[tensor].op_type
    assert tensor not in q_to_dq
    assert _io_types(model) == {TensorProto.FLOAT}


def test_int8_resnet18_explicit_qdq_and_agreement(gender_int8):
    model = onnx.load(str(gender_int8.path))
    _check_int8_graph(model)
    # FP16 in the unquantised layers: Q/DQ scales are FP16 and the graph is opset >= 19
    assert gender_int8.fp16_in_int8
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 19
    inits = _initializers(model)
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(s.data_type == TensorProto.FLOAT16 for s in scales)

    a = gender_int8.agreement
    assert a is not None and a.images == 6 and a.nonfinite == 0
    assert a.argmax_agreement == 1.0
    assert a.max_abs_dp < 0.02
    assert a.mean_kl < 5e-4  # ONNX Runtime 1.32: below 2e-4; 1.23 (Python 3.10): 2.7e-4
    assert gender_int8.calibration_images == 6


def test_int8_without_fp16_keeps_fp32_scales(gender, gender_calib, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="builders.precision")
    prepared = prepare(
        gender.onnx_path, gender.spec, Precision.INT8, None, tmp_path, calib=gender_calib, fp16_in_int8=False
    )
    # ONNX Runtime's advice to pre-process is kept out of the user's warnings
    advice = [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert advice and all(r.name == "builders.precision" and r.levelno == logging.DEBUG for r in advice), advice
    model = onnx.load(str(prepared.path))
    _check_int8_graph(model)
    assert not prepared.fp16_in_int8
    inits = _initializers(model)
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert all(s.data_type == TensorProto.FLOAT for s in scales)
    assert prepared.agreement.argmax_agreement == 1.0 and prepared.agreement.max_abs_dp < 0.02


def test_only_the_quantisers_advice_is_dropped_and_logging_is_left_unconfigured():
    code = (
        "import logging, sys\n"
        "from builders.precision import _pre_process_advice_dropped\n"
        "mine = logging.getLogger('mine')\n"
        "mine.addHandler(logging.StreamHandler(sys.stdout))\n"
        "with _pre_process_advice_dropped():\n"
        "    logging.warning('Please consider pre-processing before quantization. See x')\n"  # as ONNX Runtime does
        "    logging.getLogger('builders.precision').warning('kept')\n"
        "    logging.warning('other root warning')\n"
        "    mine.warning('handled by its own handler')\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "logging.warning('Please consider pre-processing before quantization.')\n"  # outside: as before
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # unconfigured: Python's last resort prints the bare messages; outside, ORT's call configures the root
    assert proc.stderr.splitlines() == ["kept", "other root warning",
                                        "WARNING:root:Please consider pre-processing before quantization."], proc.stderr
    assert proc.stdout.splitlines() == ["handled by its own handler"]


def test_strict_bounds_fail_loudly(gender, gender_calib, tmp_path):
    impossible = AgreementBounds(min_argmax_agreement=1.0, max_abs_dp=0.0, max_mean_kl=0.0)
    with pytest.raises(ModelError, match="disagrees with FP32 beyond bounds: max \\|dp\\|"):
        prepare(
            gender.onnx_path, gender.spec, Precision.FP16, None, tmp_path, calib=gender_calib,
            bounds=impossible, strict=True,
        )


def test_strict_bounds_hold_for_a_reused_graph_too(gender, gender_calib, tmp_path):
    impossible = AgreementBounds(min_argmax_agreement=1.0, max_abs_dp=0.0, max_mean_kl=0.0)
    lenient = prepare(gender.onnx_path, gender.spec, Precision.FP16, None, tmp_path, calib=gender_calib,
                      bounds=impossible)  # warned, cached
    assert any("beyond bounds" in n for n in lenient.notes)
    with pytest.raises(ModelError, match="disagrees with FP32 beyond bounds"):
        prepare(gender.onnx_path, gender.spec, Precision.FP16, None, tmp_path, calib=gender_calib,
                bounds=impossible, strict=True)
    assert prepare(gender.onnx_path, gender.spec, Precision.FP16, None, tmp_path, calib=gender_calib,
                   strict=True).from_cache  # within the default bounds


def test_a_model_the_quantiser_rejects_is_a_one_line_model_error(gender_calib, tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    path = make_tiny_classifier(tmp_path / "tiny.onnx", size=224, classes=2)
    model = onnx.load(str(path))
    model.graph.node[0].op_type = "NoSuchOp"  # a graph ONNX Runtime cannot run or calibrate
    onnx.save(model, str(path))
    spec = SpecRegistry.builtin().get("gender")
    with pytest.raises(ModelError, match="^INT8 quantisation by ONNX Runtime failed on this model: "):
        prepare(path, spec, Precision.INT8, None, tmp_path / "out", calib=gender_calib)


def test_a_killed_preparations_old_temp_file_is_removed_a_fresh_one_kept(gender, tmp_path):
    import os
    import time

    old, fresh = tmp_path / ".x.fp16.onnx.abc.tmp", tmp_path / ".y.fp16.onnx.def.tmp"
    for f in (old, fresh):
        f.write_bytes(b"half a graph")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    prepare(gender.onnx_path, gender.spec, Precision.FP16, None, tmp_path, force=True)
    assert not old.exists() and fresh.exists()  # the fresh one may be another run's, being written


def test_int8_needs_calibration_images(gender, tmp_path):
    with pytest.raises(InputError, match="INT8 needs calibration images"):
        prepare(gender.onnx_path, gender.spec, Precision.INT8, None, tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        prepare(tmp_path / "missing.onnx", gender.spec, Precision.FP16, None, tmp_path)


def test_prepared_files_are_reused_until_something_changes(gender, calib_paths, tmp_path, caplog):
    images = [p for p in calib_paths if "broken" not in p.name][:4]
    first = prepare(gender.onnx_path, gender.spec, Precision.FP16, images, tmp_path)
    assert not first.from_cache and first.agreement is not None
    record = json.loads(first.path.with_suffix(".prep.json").read_text())
    assert record["key"]["calibration_sha256"] == first.calibration_sha256

    again = prepare(gender.onnx_path, gender.spec, Precision.FP16, list(reversed(images)), tmp_path)
    assert again.from_cache and again.agreement == first.agreement and again.sha256 == first.sha256

    with caplog.at_level(logging.INFO, logger="builders.precision"):
        other_set = prepare(gender.onnx_path, gender.spec, Precision.FP16, images[:3], tmp_path)
        assert not other_set.from_cache and other_set.agreement.images == 3 and other_set.path != first.path
        # going back to the first set reuses its file: one file per source and set
        assert prepare(gender.onnx_path, gender.spec, Precision.FP16, images, tmp_path).from_cache
        other_set.path.write_bytes(other_set.path.read_bytes() + b"\0")
        tampered = prepare(gender.onnx_path, gender.spec, Precision.FP16, images[:3], tmp_path)
        assert not tampered.from_cache
        record = json.loads(first.path.with_suffix(".prep.json").read_text())
        record["key"]["recipe_version"] = -1  # as if made by another recipe
        first.path.with_suffix(".prep.json").write_text(json.dumps(record))
        assert not prepare(gender.onnx_path, gender.spec, Precision.FP16, images, tmp_path).from_cache
    assert "stale" in caplog.text and "modified after preparation" in caplog.text

    forced = prepare(gender.onnx_path, gender.spec, Precision.FP16, images[:3], tmp_path, force=True)
    assert not forced.from_cache


def test_cpu_path_runs_every_precision_and_reports_speed(gender, gender_fp16, gender_int8, gender_calib):
    size = gender.spec.preprocess.size
    reference = run_cpu(gender.onnx_path, gender_calib.tensors)
    for prepared in (gender_fp16, gender_int8):
        out = run_cpu(prepared.path, gender_calib.tensors)
        assert out.shape == reference.shape and out.dtype == np.float32
        assert (out.argmax(axis=1) == reference.argmax(axis=1)).all()
    for path, precision in ((gender.onnx_path, "fp32"), (gender_fp16.path, "fp16"), (gender_int8.path, "int8")):
        speed = measure_cpu_speed(path, size, precision=precision, batch_size=2, min_seconds=0.2, max_iterations=3)
        assert speed.images_per_s > 0 and speed.precision == precision and speed.iterations >= 1


# --------------------------------------------------------------------------- CAFormer-S36 (quality)


@pytest.fixture(scope="module")
def quality_prepared(random_models, calib_paths, tmp_path_factory):
    quality = random_models["quality/baseline"]
    images = [p for p in calib_paths if "broken" not in p.name][:4]
    calib = load_calibration_set(images, quality.spec, batch_size=4)
    out = tmp_path_factory.mktemp("quality")
    fp16 = prepare(quality.onnx_path, quality.spec, Precision.FP16, None, out, calib=calib)
    int8 = prepare(quality.onnx_path, quality.spec, Precision.INT8, None, out, calib=calib)
    return quality, fp16, int8


@pytest.mark.slow
def test_fp16_caformer_keeps_layernorm_and_softmax_fp32(quality_prepared):
    _, fp16, _ = quality_prepared
    model = onnx.load(str(fp16.path))
    assert _io_types(model) == {TensorProto.FLOAT}
    types = _value_types(model)
    sensitive = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(sensitive) > 50
    assert all(types[n.input[0]] == TensorProto.FLOAT for n in sensitive)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in matmuls)

    a = fp16.agreement
    assert a.argmax_agreement == 1.0 and a.nonfinite == 0
    assert a.max_abs_dp < 5e-3
    assert a.mean_kl < 1e-5


@pytest.mark.slow
def test_int8_caformer_qdq_fp16_and_agreement(quality_prepared):
    _, _, int8 = quality_prepared
    model = onnx.load(str(int8.path))
    _check_int8_graph(model)
    assert int8.fp16_in_int8
    a = int8.agreement
    assert a.nonfinite == 0
    assert a.argmax_agreement >= 0.75
    assert a.max_abs_dp < 0.08
    assert a.mean_kl < 5e-3


# --------------------------------------------------------------------------- small graphs (seconds)


def _tiny_calib(n: int = 5, size: int = 8, seed: int = 0) -> CalibrationSet:
    """Preprocessed-looking tensors for the tiny classifier; image 3 is much brighter than
    the others, so a range measured without it is visibly narrower."""
    rng = np.random.default_rng(seed)
    tensors = rng.uniform(0.0, 1.0, (n, 3, size, size)).astype(np.float32)
    tensors[min(3, n - 1)] *= 7.0
    return CalibrationSet(tensors=tensors, paths=tuple(Path(f"/calib/{i}.png") for i in range(n)), skipped=(),
                          sha256=f"{seed:064x}")


@pytest.fixture()
def tiny_model(tmp_path) -> Path:
    from tests.model_fixtures import make_tiny_classifier

    return make_tiny_classifier(tmp_path / "tiny.onnx", size=8, classes=2)


def _prepare_tiny(model: Path, out: Path, precision: Precision = Precision.FP16, **kw):
    """:func:`prepare` of a tiny classifier (gender spec, logits out) on :func:`_tiny_calib`'s
    tensors unless ``calib`` is given."""
    kw.setdefault("calib", _tiny_calib())
    spec = SpecRegistry.builtin().get("gender")
    return prepare(model, spec, precision, None, out, output_kind=OutputKind.LOGITS, **kw)


def test_fp16_keeps_layernorm_and_softmax_fp32_and_the_matmul_fp16():
    from builders.precision import convert_fp16

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("Softmax", ["n"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])], initializer=inits)
    model = convert_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    types = _value_types(model)
    assert _io_types(model) == {TensorProto.FLOAT}
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), names  # see the next test
    ops = {n.op_type: n for n in model.graph.node}
    assert types[ops["MatMul"].input[0]] == TensorProto.FLOAT16 and types[ops["MatMul"].input[1]] == TensorProto.FLOAT16
    assert types[ops["LayerNormalization"].input[0]] == TensorProto.FLOAT
    assert types[ops["Softmax"].input[0]] == TensorProto.FLOAT


def test_nodes_get_unique_names_before_the_fp16_converter_names_its_casts_after_them():
    # ONNX Runtime's converter up to 1.23 (Python 3.10's last) named the Casts around the
    # unnamed LayerNormalization and Softmax of the test above alike: a cycle
    from builders.precision import name_nodes_uniquely

    body = helper.make_graph([helper.make_node("Neg", ["a"], ["t"]), helper.make_node("Neg", ["t"], ["u"], name="Relu_0")],
                             "then", [], [helper.make_tensor_value_info("u", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="Relu_1"),
        helper.make_node("Relu", ["b"], ["c"], name="Relu_1"),  # ONNX allows a name twice
        helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = name_nodes_uniquely(helper.make_model(graph))
    named = [n.name for n in model.graph.node]
    for node in model.graph.node:
        for sub in (a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
            named += [n.name for n in sub.node]
    assert all(named) and len(set(named)) == len(named) == 8, named
    assert named[1] == "Relu_1" and named[2] != "Relu_1"  # the first of a name keeps it
    assert "Relu_0" in named[4:]  # the subgraph's own name is kept: no other node took it


def test_topological_sort_counts_what_a_subgraph_takes_from_the_outer_graph():
    then_branch = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Relu", ["x"], ["a"], name="producer"),  # used only inside the branches
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    topological_sort(model)
    assert [n.name for n in model.graph.node] == ["producer", "branch"]
    onnx.checker.check_model(model)


def test_topological_sort_counts_what_a_nested_subgraph_takes_from_the_outer_graph():
    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])

    inner = helper.make_node("If", ["cond"], ["n"],
                             then_branch=helper.make_graph([helper.make_node("Neg", ["a"], ["n1"])], "n_then", [], [value("n1")]),
                             else_branch=helper.make_graph([helper.make_node("Abs", ["a"], ["n2"])], "n_else", [], [value("n2")]))
    then_branch = helper.make_graph([inner], "then", [], [value("n")])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [value("e")])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Relu", ["x"], ["a"], name="producer"),  # used only two scopes down
    ]
    graph = helper.make_graph(nodes, "g", [value("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    topological_sort(model)
    assert [n.name for n in model.graph.node] == ["producer", "branch"]
    onnx.checker.check_model(model)


def test_compare_outputs_kl_is_of_fp32_against_the_prepared_averaged_over_images():
    reference = np.array([[2.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.0, 3.0, 1.0]], dtype=np.float32)
    test = reference.copy()
    test[0] = [0.0, 0.0, 1.0]  # one image's top class moved
    a = compare_outputs(reference, test, OutputKind.LOGITS)

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    p, q = softmax(reference[0].astype(np.float64)), softmax(test[0].astype(np.float64))
    kl = float(np.sum(p * np.log(p / q)))  # KL(p_fp32 || p_prepared)
    assert abs(kl - float(np.sum(q * np.log(q / p)))) > 0.05  # the reverse direction is another figure
    assert a.max_kl == pytest.approx(kl, rel=1e-6)
    assert a.mean_kl == pytest.approx(kl / 3, rel=1e-6)  # the mean over the three images, two of them exact
    assert a.max_abs_dp == pytest.approx(float(np.abs(p - q).max()), rel=1e-6)  # on probabilities
    assert a.max_abs_doutput == pytest.approx(2.0)  # on the raw logits
    assert a.argmax_agreement == pytest.approx(2 / 3)


def test_int8_activation_ranges_are_measured_on_every_calibration_image(tiny_model, tmp_path):
    calib = _tiny_calib()
    spec = SpecRegistry.builtin().get("gender")
    prepared = prepare(tiny_model, spec, Precision.INT8, None, tmp_path / "out", calib=calib, fp16_in_int8=False,
                       output_kind=OutputKind.LOGITS)
    model = onnx.load(str(prepared.path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    dq = _producers(model)[gemm.input[0]]  # the pooled activation, dequantised
    # MinMax, symmetric int8: max |x| over all images / 127; image 3 (the bright one) sets it
    pooled = calib.tensors.mean(axis=(2, 3))
    assert float(inits[dq.input[1]]) == pytest.approx(float(np.abs(pooled).max()) / 127, rel=1e-5)
    assert prepared.calibration_images == 5 and prepared.agreement.images == 5


def test_a_prepared_file_is_not_reused_for_another_preprocessing_or_fp16_setting(tiny_model, tmp_path):
    import dataclasses

    calib = _tiny_calib()
    spec = SpecRegistry.builtin().get("gender")
    out = tmp_path / "out"

    def run(spec, precision=Precision.FP16, **kw):
        return prepare(tiny_model, spec, precision, None, out, calib=calib, output_kind=OutputKind.LOGITS, **kw)

    first = run(spec)
    again = run(spec)
    assert again.from_cache and again.calibration_images == first.calibration_images == 5
    # the same images normalised otherwise (a spec file changed mean/std) are other tensors
    other = dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, mean=(0.5, 0.5, 0.5)))
    assert not run(other).from_cache

    int8 = run(spec, Precision.INT8)
    assert not int8.from_cache and int8.fp16_in_int8
    fp32_rest = run(spec, Precision.INT8, fp16_in_int8=False)  # other recipe, other file
    assert not fp32_rest.from_cache and not fp32_rest.fp16_in_int8
    assert fp32_rest.path != int8.path
    scales = [t for t in onnx.load(str(fp32_rest.path)).graph.initializer if t.name.endswith("_scale")]
    assert scales and all(t.data_type == TensorProto.FLOAT for t in scales)


def test_runs_alternating_between_recipes_reuse_each_prepared_file(tiny_model, tmp_path):
    import dataclasses

    gender = SpecRegistry.builtin().get("gender")
    spec = dataclasses.replace(gender, preprocess=dataclasses.replace(gender.preprocess, size=8))  # the tiny model's
    other = dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, mean=(0.5, 0.5, 0.5)))
    from PIL import Image

    rng = np.random.default_rng(3)
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images[-1])
    out = tmp_path / "out"

    def run(spec, **kw):
        return prepare(tiny_model, spec, Precision.INT8, images, out, output_kind=OutputKind.LOGITS, **kw)

    recipes = [(spec, {}), (spec, {"fp16_in_int8": False}), (other, {})]
    first = [run(s, **kw) for s, kw in recipes]
    assert not any(p.from_cache for p in first)
    assert len({p.path for p in first}) == 3
    again = [run(s, **kw) for s, kw in recipes]  # each one is still there, none redone
    assert all(p.from_cache for p in again)
    assert [p.sha256 for p in again] == [p.sha256 for p in first]


def test_cpu_speed_is_images_per_second_without_the_warm_up(monkeypatch):
    import builders.precision as precision
    from types import SimpleNamespace

    clock = [0.0]
    runs = []

    class Session:
        def get_inputs(self):
            return [SimpleNamespace(name="input", shape=["batch", 3, 8, 8], type="tensor(float)")]

        def run(self, _, feed):
            runs.append(feed["input"].shape)
            clock[0] += 10.0 if len(runs) == 1 else 0.5  # a slow first run, then 0.5 s a batch

    monkeypatch.setattr(precision, "cpu_session", lambda path, threads=None: Session())
    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])
    speed = measure_cpu_speed(Path("m.onnx"), 8, precision="fp16", batch_size=4, min_seconds=1.0, max_iterations=50)
    assert runs == [(4, 3, 8, 8)] * 3  # the warm-up, then two timed batches reach min_seconds
    assert speed.iterations == 2
    assert speed.seconds_per_batch == pytest.approx(0.5)
    assert speed.images_per_s == pytest.approx(8.0)  # 4 images a batch, not batches/s


def test_cpu_speed_feeds_a_pinned_float16_input_as_the_graph_wants(tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    # a user's graph pinned to batch 3 with a float16 input: float32 rows at batch_size
    # would be refused by ONNX Runtime
    path = make_tiny_classifier(tmp_path / "pinned.onnx", size=8, batch=3, float16_input=True)
    speed = measure_cpu_speed(path, 8, batch_size=8, min_seconds=0.0, max_iterations=2)
    assert speed.batch_size == 3 and speed.iterations == 1
    assert speed.images_per_s == pytest.approx(3 / speed.seconds_per_batch)


def test_the_calibration_reader_feeds_every_image_once_in_batches():
    from builders.calibration import ort_data_reader

    calib = _tiny_calib(n=5)
    reader = ort_data_reader(calib, "input", 2)
    batches = list(iter(reader.get_next, None))
    assert [b["input"].shape[0] for b in batches] == [2, 2, 1] and len(reader) == 3
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), calib.tensors)
    # a graph pinned to a batch of 2, fed in float16: the last batch is zero-padded
    pinned = list(iter(ort_data_reader(calib, "input", 2, dtype=np.float16, pad=True).get_next, None))
    assert [b["input"].shape[0] for b in pinned] == [2, 2, 2]
    assert all(b["input"].dtype == np.float16 for b in pinned)
    np.testing.assert_array_equal(pinned[-1]["input"][0], calib.tensors[4].astype(np.float16))
    assert not pinned[-1]["input"][1].any()


def test_run_cpu_at_a_pinned_batch_returns_one_row_per_image(tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    pinned = make_tiny_classifier(tmp_path / "pinned.onnx", size=8, classes=2, batch=4)
    dynamic = make_tiny_classifier(tmp_path / "dynamic.onnx", size=8, classes=2)  # same seed, same weights
    tensors = _tiny_calib(n=6).tensors
    out = run_cpu(pinned, tensors)
    assert out.shape == (6, 2)
    np.testing.assert_allclose(out, run_cpu(dynamic, tensors, batch_size=1), rtol=1e-5, atol=1e-6)


def test_an_undecodable_first_image_does_not_shift_the_others(tmp_path):
    from PIL import Image

    spec = SpecRegistry.builtin().get("gender")
    rng = np.random.default_rng(7)
    (tmp_path / "a.png").write_bytes(b"broken")  # first in its chunk
    for name in ("b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    calib = load_calibration_set(sorted(tmp_path.glob("*.png")), spec)
    good = [tmp_path / "b.png", tmp_path / "c.png"]
    assert list(calib.paths) == good and len(calib.skipped) == 1 and "a.png" in calib.skipped[0]
    assert calib.sha256 == calibration_set_sha256(good)
    np.testing.assert_array_equal(calib.tensors, load_calibration_set(good, spec).tensors)


def test_preprocessed_calibration_tensors_with_nan_are_refused(tmp_path):
    spec = SpecRegistry.builtin().get("gender")
    size = spec.preprocess.size
    image = tmp_path / "a.png"
    image.write_bytes(b"any bytes: the preprocessing is a stand-in")

    def preprocess(blobs):
        tensors = np.zeros((len(blobs), 3, size, size), np.float32)
        tensors[0, 0, 0, 0] = np.nan
        return list(range(len(blobs))), tensors, {}

    with pytest.raises(InputError, match="contain NaN or Inf"):
        load_calibration_set([image], spec, preprocess=preprocess)


def test_identity_of_a_weight_is_folded_unless_it_is_a_graph_output():
    from builders.precision import fold_identity_initializers

    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["w"], ["w_shared"], name="shared"),
            helper.make_node("MatMul", ["x", "w_shared"], ["y"], name="mm"),
            helper.make_node("Identity", ["w"], ["w_out"], name="exported"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [2, 2])],
        initializer=[w],
    )
    model = fold_identity_initializers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [n.name for n in model.graph.node] == ["mm", "exported"]
    assert list(model.graph.node[0].input) == ["x", "w"]
    onnx.checker.check_model(model)


def test_folding_a_weights_identity_rewires_its_uses_inside_subgraphs():
    """An If branch (and an If nested in one) may use the Identity's output by name."""
    import onnxruntime as ort

    from builders.precision import fold_identity_initializers

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])

    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [value(out)])

    inner_if = helper.make_node("If", ["cond"], ["n"],
                                then_branch=branch("n_then", [helper.make_node("Abs", ["w_shared"], ["n1"])], "n1"),
                                else_branch=branch("n_else", [helper.make_node("Neg", ["w_shared"], ["n2"])], "n2"))
    then_b = branch("then", [inner_if, helper.make_node("Add", ["x", "n"], ["t"])], "t")
    else_b = branch("else", [helper.make_node("Sub", ["x", "w_shared"], ["e"])], "e")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_shared"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_b, else_branch=else_b)],
        "g", [value("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [value("y")],
        initializer=[numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.array([3.0, -1.0], np.float32)

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return [s.run(None, {"x": x, "cond": np.array(c)})[0] for c in (True, False)]

    before = run(model)
    folded = fold_identity_initializers(model)
    assert [n.op_type for n in folded.graph.node] == ["If"]
    onnx.checker.check_model(folded, full_check=True)
    after = run(folded)
    np.testing.assert_array_equal(after[0], x + np.array([1.0, 2.0], np.float32))  # nested If's then: |w|
    np.testing.assert_array_equal(after[1], x - np.array([1.0, 2.0], np.float32))
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- edge cases (graph surgery, int8, cache key, calibration)


def test_declared_probabilities_with_negative_entries_are_compared_as_logits():
    # rows summing to 1 are not probabilities when an entry is negative
    out = np.array([[1.5, -0.5], [0.2, 0.8]], dtype=np.float32)
    assert compare_outputs(out, out, OutputKind.PROBABILITIES).softmax_applied


def test_topological_sort_refuses_a_cycle():
    nodes = [helper.make_node("Relu", ["b"], ["a"], name="one"), helper.make_node("Neg", ["a"], ["b"], name="two"),
             helper.make_node("Add", ["x", "a"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(ModelError, match="cycle"):
        topological_sort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_folding_a_weights_identity_drops_the_value_info_of_the_folded_name():
    from builders.precision import fold_identity_initializers

    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_shared"]), helper.make_node("MatMul", ["x", "w_shared"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")],
        value_info=[helper.make_tensor_value_info("w_shared", TensorProto.FLOAT, [2, 2])],
    )
    model = fold_identity_initializers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [v.name for v in model.graph.value_info] == []


def test_initializers_listed_as_graph_inputs_are_not_image_inputs(tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    # older exports (IR < 4) list every weight as a graph input too
    old = make_tiny_classifier(tmp_path / "old.onnx", size=8, classes=2, weights_as_inputs=True)
    prepared = _prepare_tiny(old, tmp_path / "out")
    assert prepared.agreement.images == 5 and prepared.agreement.argmax_agreement == 1.0


def test_int8_refuses_a_quantised_graph_with_non_standard_ops(tiny_model, tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    real = ortq.quantize_static

    def with_a_contrib_op(model_input, model_output, *args, **kwargs):
        real(model_input, model_output, *args, **kwargs)
        model = onnx.load(model_output)
        model.graph.node[0].domain = "com.microsoft"
        onnx.save(model, model_output)

    monkeypatch.setattr(ortq, "quantize_static", with_a_contrib_op)
    with pytest.raises(ModelError, match="non-standard ops"):
        _prepare_tiny(tiny_model, tmp_path / "out", Precision.INT8)


def test_int8_whose_fp16_step_fails_keeps_fp32_and_its_record_says_so(tiny_model, tmp_path, monkeypatch):
    import builders.precision as precision

    def refuse(model, *args, **kwargs):
        raise ModelError("FP16 conversion produced an invalid ONNX graph: stand-in")

    monkeypatch.setattr(precision, "convert_fp16", refuse)
    first = _prepare_tiny(tiny_model, tmp_path / "out", Precision.INT8)
    assert not first.fp16_in_int8 and any("stay FP32" in n for n in first.notes)
    again = _prepare_tiny(tiny_model, tmp_path / "out", Precision.INT8)
    assert again.from_cache and not again.fp16_in_int8


def test_int8_of_a_graph_pinned_to_a_batch_calibrates_on_a_padded_last_batch(tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    pinned = make_tiny_classifier(tmp_path / "pinned.onnx", size=8, classes=2, batch=2)
    prepared = _prepare_tiny(pinned, tmp_path / "out", Precision.INT8, calib=_tiny_calib(n=5))
    assert prepared.agreement.images == 5 and prepared.agreement.nonfinite == 0


def test_a_prepared_file_is_redone_for_another_onnxruntime_or_kept_fp32_ops(tiny_model, tmp_path, monkeypatch):
    import onnxruntime

    import builders.precision as precision

    def run():
        return _prepare_tiny(tiny_model, tmp_path / "out")

    assert not run().from_cache and run().from_cache
    monkeypatch.setattr(onnxruntime, "__version__", "0.0.1")
    assert not run().from_cache and run().from_cache
    monkeypatch.setattr(precision, "FP32_OPS", precision.FP32_OPS - {"GlobalAveragePool"})
    assert not run().from_cache


def test_an_unreadable_preparation_record_is_redone_not_raised(tiny_model, tmp_path):
    def run():
        return _prepare_tiny(tiny_model, tmp_path / "out")

    first = run()
    first.path.with_suffix(".prep.json").write_text("{ half a record")
    assert not run().from_cache and run().from_cache


def test_a_reused_graph_outside_the_bounds_is_only_refused_when_strict(tiny_model, tmp_path):
    impossible = AgreementBounds(min_argmax_agreement=1.0, max_abs_dp=0.0, max_mean_kl=0.0)

    def run(**kw):
        return _prepare_tiny(tiny_model, tmp_path / "out", bounds=impossible, **kw)

    assert any("beyond bounds" in n for n in run().notes)
    assert run().from_cache  # lenient: reused as it is
    with pytest.raises(ModelError, match="beyond bounds"):
        run(strict=True)


def test_output_kind_overrides_the_specs_output(tiny_model, tmp_path):
    import dataclasses

    model = onnx.load(str(tiny_model))
    model.graph.node[-1].output[0] = "logits"
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["output"], axis=1))
    onnx.save(model, str(tiny_model))
    spec = dataclasses.replace(SpecRegistry.builtin().get("gender"), output=OutputKind.LOGITS)
    prepared = prepare(tiny_model, spec, Precision.FP16, None, tmp_path / "out", calib=_tiny_calib(),
                       output_kind=OutputKind.PROBABILITIES)
    assert not prepared.agreement.softmax_applied


def _stub_preprocess(size, bad=()):
    def run(blobs):
        ok = [i for i, b in enumerate(blobs) if b not in bad]
        return ok, np.full((len(ok), 3, size, size), 0.5, np.float32), {}
    return run


def test_calibration_image_count_must_be_positive_and_find_takes_a_limit(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(InputError, match="at least 1"):
        find_calibration_images(tmp_path, limit=0)
    assert len(CalibrationImages.find(tmp_path, limit=1)) == 1 and len(CalibrationImages.find(tmp_path)) == 2


def test_an_unreadable_calibration_image_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read calibration image"):
        calibration_set_sha256([tmp_path / "missing.png"])


def test_calibration_set_of_no_paths_is_refused():
    spec = SpecRegistry.builtin().get("gender")
    with pytest.raises(InputError, match="no calibration images given"):
        load_calibration_set([], spec, preprocess=_stub_preprocess(spec.preprocess.size))


def test_a_missing_calibration_image_is_skipped_and_does_not_shift_the_others(tmp_path):
    spec = SpecRegistry.builtin().get("gender")
    good = [tmp_path / "b.png", tmp_path / "c.png"]
    for p in good:
        p.write_bytes(p.name.encode())
    calib = load_calibration_set([tmp_path / "a.png", *good], spec, preprocess=_stub_preprocess(spec.preprocess.size))
    assert list(calib.paths) == good and len(calib.skipped) == 1 and "a.png" in calib.skipped[0]


def test_preprocessing_of_the_wrong_shape_is_refused(tmp_path):
    spec = SpecRegistry.builtin().get("gender")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="preprocessing returned shape"):
        load_calibration_set([tmp_path / "a.png"], spec, preprocess=_stub_preprocess(spec.preprocess.size - 1))


def test_int8_of_a_float16_input_graph_calibrates_on_float16_tensors(tmp_path):
    from tests.model_fixtures import make_tiny_classifier

    path = make_tiny_classifier(tmp_path / "fp16_input.onnx", size=8, classes=2, float16_input=True)
    prepared = _prepare_tiny(path, tmp_path / "out", Precision.INT8, fp16_in_int8=False)
    assert prepared.agreement.images == 5 and prepared.agreement.nonfinite == 0


def test_fp16_a_weight_shared_by_kept_fp32_and_fp16_nodes_is_cast_once():
    # The TorchScript exporter shares equal initializers (a random caformer's all-ones
    # LayerNorm weights and res_scales); ONNX Runtime's converter from 1.25 to 1.31 (the
    # GPU image has 1.30) cast that FP16 weight once per LayerNorm under one output name
    # (not SSA); see drop_repeated_casts. CI's 1.32 and the floor's 1.21 do not: the next
    # test gives drop_repeated_casts such a graph itself.
    import onnxruntime as ort

    from builders.precision import convert_fp16

    inits = [numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
    nodes = [
        helper.make_node("Mul", ["x", "gamma"], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["n1"], axis=-1),
        helper.make_node("LayerNormalization", ["n1", "gamma", "beta"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializer=inits)
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32.ir_version = 8  # what every ONNX Runtime this project allows reads
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    model = convert_fp16(fp32)  # checks the graph
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs), outputs
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, atol=5e-3, rtol=0)  # measured 4.8e-4 (FP16 between the LayerNorms)


def test_drop_repeated_casts_keeps_one_of_each_identical_cast():
    """The graph ONNX Runtime 1.25-1.31 makes of the one above: the FP16 weight cast back
    to FP32 once per LayerNorm, the same Cast under the same names (and its value_info
    twice). One copy is kept; a Cast of the same output that differs is left alone."""
    import onnxruntime as ort

    from builders.precision import drop_repeated_casts

    cast = dict(inputs=["gamma16"], outputs=["gamma_cast_to_fp32"], to=TensorProto.FLOAT, name="gamma_cast_to_fp32_node")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["x16", "gamma16"], ["s16"]),
        helper.make_node("Cast", ["s16"], ["s"], to=TensorProto.FLOAT),
        helper.make_node("Cast", **cast),
        helper.make_node("LayerNormalization", ["s", "gamma_cast_to_fp32", "beta"], ["n1"], axis=-1),
        helper.make_node("Cast", **cast),
        helper.make_node("LayerNormalization", ["n1", "gamma_cast_to_fp32", "beta"], ["y"], axis=-1),
    ]
    info = helper.make_tensor_value_info("gamma_cast_to_fp32", TensorProto.FLOAT, [8])
    graph = helper.make_graph(
        nodes, "repeated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(np.ones(8, np.float16), "gamma16"),
                     numpy_helper.from_array(np.zeros(8, np.float32), "beta")],
        value_info=[info, info])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(onnx.checker.ValidationError, match="single static assignment"):
        onnx.checker.check_model(model)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    fixed = drop_repeated_casts(model)
    onnx.checker.check_model(fixed)
    assert [n.op_type for n in fixed.graph.node] == ["Cast", "Mul", "Cast", "Cast", "LayerNormalization",
                                                   "LayerNormalization"]
    assert [vi.name for vi in fixed.graph.value_info] == ["gamma_cast_to_fp32"]
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    got = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    by_hand = helper.make_model(helper.make_graph(
        [n for k, n in enumerate(nodes) if k != 5], "one_cast", graph.input, graph.output,
        initializer=graph.initializer), opset_imports=model.opset_import, ir_version=8)
    want = ort.InferenceSession(by_hand.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)

    other.graph.node[5].attribute[0].i = TensorProto.DOUBLE  # not the same Cast: kept, the checker will say so
    assert len(drop_repeated_casts(other).graph.node) == 7
