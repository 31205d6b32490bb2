"""Session-wide model fixtures (owned by the builders work; see builders/export.py).

``random_models`` maps "gender/alpha" (resnet18, 224) and "quality/baseline"
(caformer_s36, 384) to :class:`engine.models.ResolvedModel` objects holding the real
architectures with random weights (seed 0, logits output). Each is exported at most
once per session, on first access (caformer_s36 takes ~15 s on two cores), so a test
that only needs the gender model does not pay for the quality one.

Set ``ENGINE_TEST_MODEL_CACHE=/some/dir`` to keep the exports between sessions (the
cache key includes the torch version, so a stale file is never reused).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

RANDOM_MODEL_KEYS = ("gender/alpha", "quality/baseline")


class _LazyResolvedModels(Mapping):
    """A read-only mapping that exports each model on first access, once."""

    def __init__(self, cache_dir: Path) -> None:
        self._cache_dir = cache_dir
        self._resolved: dict = {}

    def __getitem__(self, key: str):
        if key not in RANDOM_MODEL_KEYS:
            raise KeyError(key)
        if key not in self._resolved:
            from engine.models import ModelSource, resolve_model
            from engine.specs import SpecRegistry

            task, variant = key.split("/")
            spec = SpecRegistry.builtin().get(task, variant)
            self._resolved[key] = resolve_model(spec, ModelSource(random_weights=True), self._cache_dir)
        return self._resolved[key]

    def __iter__(self) -> Iterator[str]:
        return iter(RANDOM_MODEL_KEYS)

    def __len__(self) -> int:
        return len(RANDOM_MODEL_KEYS)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """A model cache shared by the whole session (ENGINE_TEST_MODEL_CACHE if set)."""
    keep = os.environ.get("ENGINE_TEST_MODEL_CACHE", "").strip()
    if keep:
        path = Path(keep).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def random_models(model_cache_dir) -> Mapping:
    """{"gender/alpha": ResolvedModel, "quality/baseline": ResolvedModel}, random weights."""
    pytest.importorskip("torch", reason="random-weight models are exported with torch")
    return _LazyResolvedModels(model_cache_dir)


def make_tiny_classifier(
    path: Path,
    *,
    size: int = 8,
    classes: int = 2,
    batch: int | None = None,
    hardcoded_reshape: bool = False,
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
    weights_as_inputs: bool = False,
    float16_input: bool = False,
) -> Path:
    """Write a tiny ONNX classifier: (N, 3, size, size) float32 "input" ->
    GlobalAveragePool -> flatten -> Gemm -> (N, classes) "output".

    ``batch`` pins the batch dimension (None: symbolic "batch"). With
    ``hardcoded_reshape`` the flatten is a ``Reshape`` to ``[batch, -1]`` with the
    batch baked in, as some published exports do, so the graph cannot run at another
    batch. With ``weights_as_inputs`` the weights are listed among the graph inputs too,
    as exports before IR version 4 did. With ``float16_input`` the input is float16,
    cast to float32 first.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dim0 = batch if batch is not None else "batch"
    nodes = [helper.make_node("Cast", ["input"], ["input_f32"], to=TensorProto.FLOAT)] if float16_input else []
    nodes.append(helper.make_node("GlobalAveragePool", ["input_f32" if float16_input else "input"], ["pooled"]))
    inits = [
        numpy_helper.from_array(rng.standard_normal((classes, 3)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "fc_b"),
    ]
    if hardcoded_reshape:
        inits.append(numpy_helper.from_array(np.array([batch or 1, -1], dtype=np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]))
    else:
        nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["output"], transB=1))
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16 if float16_input else TensorProto.FLOAT,
                                       [dim0, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [dim0, classes])],
        initializer=inits,
    )
    if weights_as_inputs:
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
