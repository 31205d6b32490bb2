"""TensorRT engine builds.

Everything before the TensorRT calls (profiles, shapes, manifest planning, timing-cache
naming, behaviour without TensorRT or a GPU) runs everywhere. The builds themselves
run only under the ``gpu`` marker with the real ``tensorrt`` package; nothing here
stands in for TensorRT.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders.calibration import find_calibration_images, load_calibration_set
from builders.manifest import BuildTarget, EngineCache
from builders.precision import Precision, prepare
from builders.trt_build import (
    BatchProfile,
    DEFAULT_CONTEXTS,
    MAX_CONTEXTS,
    MAX_PROFILE_BATCH,
    BuildOptions,
    TensorRTUnavailable,
    build_engine,
    default_profile,
    input_shape_range,
    plan_manifest,
    tensorrt_unavailable_reason,
    timing_cache_path,
)
from engine.errors import DependencyError, EngineError, ModelError
from engine.specs import SpecRegistry
from tests.model_fixtures import make_tiny_classifier

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
TARGET = BuildTarget("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.1")


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def specs() -> SpecRegistry:
    return SpecRegistry.builtin()


@pytest.fixture(scope="module")
def gender(random_models):
    return random_models["gender/alpha"]


@pytest.fixture(scope="module")
def gender_fp16(gender, tmp_path_factory):
    return prepare(gender.onnx_path, gender.spec, Precision.FP16, None, tmp_path_factory.mktemp("prep"))


# --------------------------------------------------------------------------- plain Python


def test_batch_profile_parse_and_validation():
    assert BatchProfile.parse("1,32,64") == BatchProfile(1, 32, 64)
    assert BatchProfile.parse(" 2:8:8 ") == BatchProfile(2, 8, 8)
    for bad in ("1,2", "a,b,c", "1,2,3,4"):
        with pytest.raises(ModelError, match="three integers"):
            BatchProfile.parse(bad)
    with pytest.raises(ModelError, match="min <= opt <= max"):
        BatchProfile(4, 2, 8)
    with pytest.raises(ModelError, match="min <= opt <= max"):
        BatchProfile(0, 2, 8)


def test_default_profiles_per_model(specs):
    gender, quality = default_profile(specs.get("gender")), default_profile(specs.get("quality"))
    assert gender.min == quality.min == 1
    assert gender.max > quality.max  # the 224 ResNet takes bigger batches than CAFormer at 384
    assert quality.opt <= quality.max


def test_build_options_validation():
    with pytest.raises(ModelError, match="workspace"):
        BuildOptions(workspace_bytes=1024)
    with pytest.raises(ModelError, match="optimisation level"):
        BuildOptions(optimization_level=6)
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ModelError, match="concurrent execution contexts must be an integer 1..16"):
            BuildOptions(contexts=bad)


def test_input_shape_range_from_graph(tmp_path, specs):
    spec = dataclasses.replace(
        specs.get("gender"), preprocess=dataclasses.replace(specs.get("gender").preprocess, size=8)
    )
    dynamic = make_tiny_classifier(tmp_path / "dyn.onnx", size=8)
    shape = input_shape_range(dynamic, spec, BatchProfile(1, 4, 16))
    assert (shape.name, shape.min, shape.opt, shape.max) == ("input", (1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))

    fixed = make_tiny_classifier(tmp_path / "fixed.onnx", size=8, batch=1)
    with pytest.raises(ModelError, match="batch is fixed at 1"):
        input_shape_range(fixed, spec, BatchProfile(1, 4, 16))
    assert input_shape_range(fixed, spec, BatchProfile(1, 1, 1)).max == (1, 3, 8, 8)

    with pytest.raises(ModelError, match="expects N x 3 x 224 x 224"):
        input_shape_range(dynamic, specs.get("gender"), BatchProfile(1, 4, 16))


def test_plan_manifest_records_what_the_key_needs(gender, gender_fp16):
    profile = BatchProfile(1, 8, 16)
    manifest = plan_manifest(gender_fp16, gender.spec, profile, TARGET, BuildOptions(optimization_level=2))
    assert manifest.model == "gender/alpha"
    assert manifest.precision == "fp16"
    assert manifest.onnx_sha256 == gender_fp16.sha256 != gender_fp16.source_sha256
    assert manifest.profile[0].min == (1, 3, 224, 224) and manifest.profile[0].max == (16, 3, 224, 224)
    assert manifest.target == TARGET and manifest.builder_optimization_level == 2
    assert manifest.input_names == ("input",) and manifest.output_names == ("output",)
    assert manifest.contexts == DEFAULT_CONTEXTS
    more = plan_manifest(gender_fp16, gender.spec, profile, TARGET, BuildOptions(optimization_level=2, contexts=5))
    assert more.contexts == 5 and more.key != manifest.key
    other_gpu = plan_manifest(gender_fp16, gender.spec, profile, dataclasses.replace(TARGET, compute_capability="8.9"))
    assert other_gpu.key != manifest.key


def test_timing_cache_is_per_gpu_and_tensorrt(tmp_path):
    a = timing_cache_path(tmp_path, TARGET)
    assert a.parent == tmp_path and a.name == "timing.nvidia-h100-80gb-hbm3.sm9.0.trt11.4.0.1.cache"
    assert timing_cache_path(tmp_path, dataclasses.replace(TARGET, tensorrt_version="10.13.0.35")) != a


@pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed here")
def test_without_tensorrt_build_stops_with_one_clear_line(gender, gender_fp16, tmp_path):
    reason = tensorrt_unavailable_reason()
    assert reason is not None and "tensorrt" in reason
    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(gender_fp16, gender.spec, tmp_path)
    err = info.value
    assert isinstance(err, DependencyError) and isinstance(err, EngineError)
    message = str(err)
    assert "\n" not in message
    assert message.startswith("TensorRT engine build needs TensorRT and an NVIDIA GPU")
    assert "prepared ONNX is ready" in message and "[gpu]" in message
    assert not any(tmp_path.iterdir())  # nothing half-written into the engine cache
    # the prepared model itself is usable on the CPU
    assert gender_fp16.path.is_file()


# --------------------------------------------------------------------------- real TensorRT builds


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt", reason="TensorRT is not installed")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_strongly_typed_engine_and_cache(trt, gender, precision, tmp_path):
    images = find_calibration_images(EXAMPLES)
    calib = load_calibration_set(images, gender.spec)
    prepared = prepare(gender.onnx_path, gender.spec, precision, None, tmp_path / "prep", calib=calib)
    cache_dir = tmp_path / "engines"
    profile = BatchProfile(1, 4, 8)
    options = BuildOptions(workspace_bytes=1 << 30, optimization_level=1)

    built = build_engine(prepared, gender.spec, cache_dir, profile, options)
    assert not built.from_cache and built.path.is_file()
    manifest = json.loads(built.manifest_path.read_text())
    assert manifest["precision"] == precision
    assert manifest["target"]["tensorrt_version"] == trt.__version__
    assert manifest["profile"][0]["max"] == [8, 3, 224, 224]
    assert manifest["build_seconds"] > 0 and manifest["engine_sha256"]
    assert timing_cache_path(cache_dir, built.manifest.target).is_file()

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(built.path.read_bytes())
    assert engine is not None
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == ["input", "output"]
    assert engine.get_tensor_dtype("input") == trt.DataType.FLOAT
    assert engine.num_optimization_profiles == manifest["contexts"] == DEFAULT_CONTEXTS
    for k in range(DEFAULT_CONTEXTS):  # identical profiles, one per execution context in use
        assert [tuple(s) for s in engine.get_tensor_profile_shape("input", k)] == [
            (1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224)]

    again = build_engine(prepared, gender.spec, cache_dir, profile, options)
    assert again.from_cache and again.path == built.path

    # a different profile is another engine, never the cached one
    other = build_engine(prepared, gender.spec, cache_dir, BatchProfile(1, 2, 4), options)
    assert not other.from_cache and other.path != built.path
    assert len(EngineCache(cache_dir).entries()) == 2


@pytest.mark.gpu
def test_parser_errors_name_the_node(trt, tmp_path, specs):
    spec = dataclasses.replace(
        specs.get("gender"), preprocess=dataclasses.replace(specs.get("gender").preprocess, size=8)
    )
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["input"], ["output"], name="bogus_node", domain="example.custom")],
        "bad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    from builders.manifest import onnx_sha256
    from builders.precision import PreparedModel

    sha = onnx_sha256(path)
    prepared = PreparedModel(path=path, precision=Precision.FP32, source_sha256=sha, sha256=sha, agreement=None)
    with pytest.raises(ModelError, match="bogus_node"):
        build_engine(prepared, spec, tmp_path / "engines", BatchProfile(1, 1, 2))
    assert not np.any([p.suffix == ".engine" for p in (tmp_path / "engines").glob("*")])


def test_batch_profile_bounds_types_and_separators():
    with pytest.raises(ModelError, match="min <= opt <= max, got 1/8/4"):
        BatchProfile(1, 8, 4)
    assert BatchProfile(1, 1, MAX_PROFILE_BATCH).max == 4096 == MAX_PROFILE_BATCH
    with pytest.raises(ModelError, match="max 4097 is above 4096"):
        BatchProfile(1, 1, 4097)
    for odd in ((1, 2.5, 4), (True, True, True)):  # a bool is an int to Python, not a batch size
        with pytest.raises(ModelError, match="must be integers"):
            BatchProfile(*odd)
    assert BatchProfile.parse("1 8 16") == BatchProfile.parse("1/8/16") == BatchProfile.parse("1, 8,16") == BatchProfile(1, 8, 16)


def test_the_default_profile_of_each_builtin_architecture(specs):
    # the sizes _DEFAULT_PROFILES documents (ResNet-18 at 224, CAFormer-S36 at 384)
    assert default_profile(specs.get("gender")) == BatchProfile(1, 128, 256)
    assert default_profile(specs.get("quality")) == BatchProfile(1, 32, 64)


def test_build_options_accept_their_bounds_and_default_to_tensorrts_level():
    assert BuildOptions().optimization_level == 3 and BuildOptions().workspace_bytes == 4 << 30
    for ok in (dict(contexts=1), dict(contexts=MAX_CONTEXTS), dict(workspace_bytes=16 << 20),
               dict(optimization_level=0), dict(optimization_level=5)):
        BuildOptions(**ok)
    with pytest.raises(ModelError, match="at least 16 MiB"):
        BuildOptions(workspace_bytes=(16 << 20) - 1)
    with pytest.raises(ModelError, match="optimisation level must be 0..5, got -1"):
        BuildOptions(optimization_level=-1)


def test_timing_cache_names_any_gpu_name(tmp_path):
    odd = dataclasses.replace(TARGET, gpu_name=" (NVIDIA) RTX 4090! ")
    assert timing_cache_path(tmp_path, odd).name == "timing.nvidia-rtx-4090.sm9.0.trt11.4.0.1.cache"
    assert timing_cache_path(tmp_path, dataclasses.replace(TARGET, gpu_name="?")).name == "timing.gpu.sm9.0.trt11.4.0.1.cache"


def test_input_shape_range_fixed_batch_dynamic_dims_and_initializer_inputs(tmp_path, specs):
    spec = dataclasses.replace(
        specs.get("gender"), preprocess=dataclasses.replace(specs.get("gender").preprocess, size=8)
    )
    four = make_tiny_classifier(tmp_path / "four.onnx", size=8, batch=4)
    with pytest.raises(ModelError, match="batch is fixed at 4; the batch profile must be 4,4,4"):
        input_shape_range(four, spec, BatchProfile(1, 4, 4))
    assert input_shape_range(four, spec, BatchProfile(4, 4, 4)).min == (4, 3, 8, 8)

    # every dimension symbolic: channels are 3, height and width the spec's size
    dims = ["N", "C", "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["output"])], "dyn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "C", 1, 1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "dyn.onnx"))
    shape = input_shape_range(tmp_path / "dyn.onnx", spec, BatchProfile(1, 2, 4))
    assert (shape.min, shape.max) == ((1, 3, 8, 8), (4, 3, 8, 8))

    # an older export lists its weights among the graph inputs: still one image input
    old = make_tiny_classifier(tmp_path / "old.onnx", size=8, weights_as_inputs=True)
    assert input_shape_range(old, spec, BatchProfile(1, 2, 4)).name == "input"


def test_plan_manifest_records_the_options_and_the_source(gender, gender_fp16):
    options = BuildOptions(workspace_bytes=1 << 30, optimization_level=1)
    manifest = plan_manifest(gender_fp16, gender.spec, BatchProfile(1, 8, 16), TARGET, options)
    assert manifest.workspace_bytes == 1 << 30 and manifest.builder_optimization_level == 1
    assert manifest.source_onnx_sha256 == gender_fp16.source_sha256
