from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.onnx_io import OnnxInfo, inspect_onnx, make_batch_dynamic
from engine.errors import ModelError
from tests.model_fixtures import make_tiny_classifier


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


# ---------------------------------------------------------------- inspect_onnx


def test_inspect_dynamic_classifier(tmp_path):
    path = make_tiny_classifier(tmp_path / "m.onnx", size=8, classes=3, metadata={"engine.task": "gender"})
    info = inspect_onnx(path)
    assert isinstance(info, OnnxInfo)
    assert info.path == path
    assert info.input.name == "input"
    assert info.input.shape == (None, 3, 8, 8)
    assert info.input.dtype == np.float32
    assert info.input.fixed_batch is None and info.dynamic_batch
    assert info.output.name == "output"
    assert info.output.shape == (None, 3)
    assert info.opset == 17
    assert info.metadata == {"engine.task": "gender"}


def test_inspect_fixed_batch(tmp_path):
    info = inspect_onnx(make_tiny_classifier(tmp_path / "m.onnx", batch=1))
    assert info.input.shape == (1, 3, 8, 8)
    assert info.input.fixed_batch == 1
    assert info.output.fixed_batch == 1


def test_inspect_ignores_initializers_listed_as_inputs(tmp_path):
    # Old exporters (IR < 4) list every weight in graph.input as well.
    w = numpy_helper.from_array(np.ones((2, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[w],
    )
    info = inspect_onnx(_save(graph, tmp_path / "old.onnx"))
    assert info.input.name == "x"
    assert info.input.shape == (None, 2)


def test_inspect_two_inputs_is_a_model_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2])],
    )
    with pytest.raises(ModelError, match=r"2 input\(s\) \['a', 'b'\]"):
        inspect_onnx(_save(graph, tmp_path / "two.onnx"))


@pytest.mark.parametrize(
    "content", [b"this is not an onnx file \x00\x01\x02\xff\xfe", b""], ids=["garbage", "empty"]
)
def test_inspect_corrupt_file_is_one_line_model_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        inspect_onnx(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_inspect_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        inspect_onnx(tmp_path / "nope.onnx")


# ---------------------------------------------------------------- make_batch_dynamic


def test_make_batch_dynamic_rewrites_and_verifies(tmp_path):
    src = make_tiny_classifier(tmp_path / "fixed.onnx", batch=1, metadata={"engine.variant": "alpha"})
    dst = tmp_path / "out" / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is True
    info = inspect_onnx(dst)
    assert info.input.fixed_batch is None and info.output.fixed_batch is None
    assert info.input.shape[1:] == (3, 8, 8)
    assert info.metadata == {"engine.variant": "alpha"}
    proto = onnx.load(str(dst))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    # Batched output equals the original model run one sample at a time.
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    batched = _run(dst, x)
    single = np.concatenate([_run(src, x[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 2)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.joinpath("out").glob("*.tmp"))


def test_make_batch_dynamic_refuses_hardcoded_reshape(tmp_path):
    src = make_tiny_classifier(tmp_path / "fixed.onnx", batch=1, hardcoded_reshape=True)
    # The graph itself is fine at its own batch.
    assert _run(src, np.zeros((1, 3, 8, 8), np.float32)).shape == (1, 2)
    dst = tmp_path / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is False
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


def test_make_batch_dynamic_refuses_graph_that_collapses_the_batch(tmp_path):
    # Runs at batch 2 without error but returns one row: must not be accepted.
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["flat"]),
            helper.make_node("ReduceMean", ["flat"], ["output"], axes=[1], keepdims=1),
        ],
        "collapse",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1])],
        initializer=[shape],
    )
    src = _save(graph, tmp_path / "collapse.onnx")
    dst = tmp_path / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is False
    assert not dst.exists()


def test_make_batch_dynamic_refuses_graph_that_mixes_samples(tmp_path):
    # output = x + mean over the batch axis: right shape at batch 2, wrong values.
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Add", ["input", "m"], ["output"]),
        ],
        "mix",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])],
    )
    src = _save(graph, tmp_path / "mix.onnx")
    dst = tmp_path / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is False
    assert not dst.exists()


def test_make_batch_dynamic_on_dynamic_model_copies(tmp_path):
    src = make_tiny_classifier(tmp_path / "dyn_src.onnx")
    dst = tmp_path / "copy.onnx"
    assert make_batch_dynamic(src, dst) is True
    assert dst.read_bytes() == src.read_bytes()


def test_make_batch_dynamic_copy_of_a_model_with_external_weights_runs_elsewhere(tmp_path):
    src = make_tiny_classifier(tmp_path / "src" / "ext.onnx")
    model = onnx.load(str(src))
    onnx.save_model(model, str(src), save_as_external_data=True, location="ext.weights", size_threshold=0)
    assert (tmp_path / "src" / "ext.weights").is_file()
    dst = tmp_path / "cache" / "copy.onnx"
    assert make_batch_dynamic(src, dst) is True
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(dst, x), _run(src, x), rtol=1e-6)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["copy.onnx"]  # self-contained


def test_model_past_the_protobuf_limit_is_written_whole_with_its_weights(tmp_path, monkeypatch):
    import builders.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)  # every model counts as "past 2 GiB"
    model = onnx.load(str(make_tiny_classifier(tmp_path / "src.onnx")))
    size = model.ByteSize()
    out = tmp_path / "out" / "big.onnx"
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for _ in range(2):  # rewriting must not append to the weights already there
        onnx_io.write_model_atomic(model, out)
        assert model.ByteSize() == size  # the caller's proto keeps its weights
        assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
        data_size = (out.parent / "big.onnx.data").stat().st_size
        np.testing.assert_allclose(_run(out, x), _run(tmp_path / "src.onnx", x), rtol=1e-6)
    assert 0 < data_size < size


def test_make_batch_dynamic_with_fixed_batch_of_four(tmp_path):
    src = make_tiny_classifier(tmp_path / "b4.onnx", batch=4)
    dst = tmp_path / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is True
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _run(src, np.concatenate([x, x]))[:2]
    np.testing.assert_allclose(_run(dst, x), ref, rtol=1e-5, atol=1e-6)


def test_inspect_reads_the_default_domain_opset_whatever_the_order(tmp_path):
    # A graph that also imports a vendor domain (listed first): the opset is the ONNX one.
    path = make_tiny_classifier(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("com.microsoft", 1), *default])
    onnx.save_model(model, str(path))
    assert inspect_onnx(path).opset == 17


def test_inspect_treats_a_zero_batch_dim_as_dynamic(tmp_path):
    # Some exporters write dim_value 0 for an unknown dimension: not a batch pinned to 0.
    path = make_tiny_classifier(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 0
    onnx.save_model(model, str(path))
    info = inspect_onnx(path)
    assert info.input.shape == (None, 3, 8, 8) and info.input.fixed_batch is None
    assert info.output.fixed_batch is None


def test_make_batch_dynamic_drops_shapes_inferred_at_the_fixed_batch(tmp_path):
    src = tmp_path / "fixed.onnx"
    make_tiny_classifier(src, batch=1)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    assert inferred.graph.value_info  # intermediate shapes recorded at batch 1
    onnx.save_model(inferred, str(src))
    dst = tmp_path / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is True
    stale = [
        vi.name
        for vi in onnx.load(str(dst)).graph.value_info
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_value")
    ]
    assert stale == []  # they would contradict the symbolic batch (TensorRT, ORT's output check)


def test_make_batch_dynamic_refuses_a_constant_graph_that_returns_one_row(tmp_path):
    # Output independent of the input and the batch baked in: at batch 2 it returns one row
    # whose values match every sample's; the row count alone tells it is wrong.
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    zero = numpy_helper.from_array(np.zeros((1, 1), dtype=np.float32), "zero")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["flat"]),
            helper.make_node("ReduceMean", ["flat"], ["m"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["m", "zero"], ["output"]),
        ],
        "constant",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1])],
        initializer=[shape, zero],
    )
    src = _save(graph, tmp_path / "constant.onnx")
    dst = tmp_path / "dyn.onnx"
    assert make_batch_dynamic(src, dst) is False
    assert not dst.exists()
