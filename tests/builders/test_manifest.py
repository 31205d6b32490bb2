"""Engine manifest, key and cache: pure Python, no TensorRT needed."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders.manifest import (
    BuildTarget,
    EngineCache,
    MANIFEST_VERSION,
    EngineQuery,
    Manifest,
    ShapeRange,
    check_engine,
    check_runtime,
    mismatches,
    onnx_sha256,
)
from engine.errors import ModelError

H100 = BuildTarget("NVIDIA H100 80GB HBM3", "9.0", "11.4.0.1")
A100 = BuildTarget("NVIDIA A100-SXM4-80GB", "8.0", "11.4.0.1")


def _manifest(**changes) -> Manifest:
    base = Manifest(
        model="quality/baseline",
        onnx_sha256="a" * 64,
        precision="fp16",
        profile=(ShapeRange("input", (1, 3, 384, 384), (32, 3, 384, 384), (64, 3, 384, 384)),),
        target=H100,
        builder_optimization_level=3,
        workspace_bytes=4 << 30,
        source_onnx_sha256="b" * 64,
        input_names=("input",),
        output_names=("output",),
    )
    return dataclasses.replace(base, **changes)


def test_key_depends_on_every_key_field_and_not_on_provenance():
    base = _manifest()
    variants = {
        "onnx": _manifest(onnx_sha256="c" * 64),
        "precision": _manifest(precision="int8"),
        "profile": _manifest(profile=(ShapeRange("input", (1, 3, 384, 384), (16, 3, 384, 384), (64, 3, 384, 384)),)),
        "gpu": _manifest(target=A100),
        "trt": _manifest(target=dataclasses.replace(H100, tensorrt_version="10.13.0.35")),
        "level": _manifest(builder_optimization_level=5),
        "workspace": _manifest(workspace_bytes=1 << 30),
        "model": _manifest(model="quality/head_crop"),
        "contexts": _manifest(contexts=4),
    }
    keys = {name: m.key for name, m in variants.items()}
    assert base.key not in keys.values()
    assert len(set(keys.values())) == len(keys)
    provenance = _manifest(build_seconds=12.5, built_at="2026-01-01T00:00:00+00:00", engine_sha256="d" * 64)
    assert provenance.key == base.key


def test_json_round_trip_keeps_everything():
    m = _manifest(build_seconds=3.25, built_at="2026-01-01T00:00:00+00:00", engine_sha256="e" * 64)
    back = Manifest.from_json(m.to_json())
    assert back == m
    data = json.loads(m.to_json())
    assert data["key"] == m.key
    assert data["target"]["compute_capability"] == "9.0"


def test_invalid_manifest_json_is_a_model_error():
    with pytest.raises(ModelError, match="not a valid engine manifest"):
        Manifest.from_json(f'{{"manifest_version": {MANIFEST_VERSION}, "model": "x"}}')
    older = json.loads(_manifest().to_json())
    older["manifest_version"] = 1  # before ``contexts``: its engine has a single profile
    del older["contexts"]
    with pytest.raises(ModelError, match="format 1 is not the supported format .*rebuild the engine"):
        Manifest.from_json(json.dumps(older))
    newer = json.loads(_manifest().to_json())
    newer["manifest_version"] = 99
    with pytest.raises(ModelError, match="format 99"):
        Manifest.from_json(json.dumps(newer))


def test_shape_range_validation():
    with pytest.raises(ModelError, match="min <= opt <= max"):
        ShapeRange("input", (8, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))
    with pytest.raises(ModelError, match="ranks"):
        ShapeRange("input", (1, 3, 8, 8), (4, 3, 8), (16, 3, 8, 8))


def test_mismatch_message_names_each_difference():
    found = _manifest(target=A100, onnx_sha256="c" * 64)
    msg = "; ".join(mismatches(found, _manifest()))
    assert "GPU: engine has 'NVIDIA A100-SXM4-80GB', needed 'NVIDIA H100 80GB HBM3'" in msg
    assert "compute capability: engine has '8.0', needed '9.0'" in msg
    assert "prepared ONNX (sha256): engine has cccccccccccc..., needed aaaaaaaaaaaa..." in msg
    assert "precision" not in msg


def test_cache_store_lookup_and_mismatch_never_used(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    stored = cache.store(b"engine-bytes", _manifest())
    assert stored.engine_path.read_bytes() == b"engine-bytes"
    assert stored.manifest.engine_sha256 and stored.manifest.engine_file == stored.engine_path.name

    hit = cache.lookup(_manifest())
    assert hit is not None and hit.engine_path == stored.engine_path

    with caplog.at_level(logging.INFO, logger="builders.manifest"):
        assert cache.lookup(_manifest(target=A100)) is None
        assert cache.lookup(_manifest(target=dataclasses.replace(H100, tensorrt_version="10.13.0.35"))) is None
        assert cache.lookup(_manifest(onnx_sha256="f" * 64)) is None
    assert "TensorRT version: engine has '11.4.0.1', needed '10.13.0.35'" in caplog.text
    assert len(cache.entries()) == 1


def test_check_engine_refuses_other_gpu_trt_or_onnx(tmp_path):
    entry = EngineCache(tmp_path).store(b"engine-bytes", _manifest())
    assert check_engine(entry.engine_path, _manifest()).key == _manifest().key
    with pytest.raises(ModelError, match="GPU: engine has 'NVIDIA H100 80GB HBM3', needed 'NVIDIA A100"):
        check_engine(entry.engine_path, _manifest(target=A100))
    with pytest.raises(ModelError, match="prepared ONNX"):
        check_engine(entry.engine_path, _manifest(onnx_sha256="0" * 64))


def test_tampered_or_orphan_engine_is_refused(tmp_path):
    cache = EngineCache(tmp_path)
    entry = cache.store(b"engine-bytes", _manifest())
    entry.engine_path.write_bytes(b"other-bytes")
    with pytest.raises(ModelError, match="modified after it was built"):
        check_engine(entry.engine_path, _manifest())
    assert cache.lookup(_manifest()) is None

    orphan = tmp_path / "orphan.engine"
    orphan.write_bytes(b"x")
    with pytest.raises(ModelError, match="no manifest"):
        check_engine(orphan, _manifest())


def test_corrupt_manifest_in_cache_is_skipped_with_a_warning(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    entry = cache.store(b"engine-bytes", _manifest())
    entry.engine_path.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="builders.manifest"):
        assert cache.entries() == []
        assert cache.lookup(_manifest()) is None
    assert "not a valid engine manifest" in caplog.text


def test_check_runtime():
    check_runtime(_manifest(), H100, "x.engine")
    with pytest.raises(ModelError, match=r"TensorRT version: engine 11\.4\.0\.1, installed 10\.13"):
        check_runtime(_manifest(), dataclasses.replace(H100, tensorrt_version="10.13.0.35"), "x.engine")


def _tiny_onnx(path, weight: float, external: bool) -> None:
    w = numpy_helper.from_array(np.full((2, 3), weight, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"]), helper.make_node("Transpose", ["w"], ["wt"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))


def test_onnx_hash_covers_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    _tiny_onnx(path, 1.0, external=True)
    first = onnx_sha256(path)
    data = tmp_path / "m.onnx.data"
    weights = np.frombuffer(data.read_bytes(), np.float32).copy()
    data.write_bytes((weights * 2).tobytes())  # new weights, same .onnx file
    assert onnx_sha256(path) != first
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelError, match="external data"):
        onnx_sha256(path)


def test_onnx_hash_of_garbage_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 definitely not protobuf" * 10)
    with pytest.raises(ModelError, match="cannot read ONNX"):
        onnx_sha256(bad)


def _query(**changes) -> EngineQuery:
    base = EngineQuery(model="quality/baseline", source_onnx_sha256="b" * 64, precision="fp16", target=H100, batch_size=32)
    return dataclasses.replace(base, **changes)


def _profile(lo: int, opt: int, hi: int) -> tuple[ShapeRange, ...]:
    return (ShapeRange("input", (lo, 3, 384, 384), (opt, 3, 384, 384), (hi, 3, 384, 384)),)


def test_run_lookup_ignores_build_options_but_not_what_decides_the_result(tmp_path):
    cache = EngineCache(tmp_path)
    # Another opt level / workspace / prepared hash (e.g. INT8 calibrated on other images)
    # is still this model at this precision on this GPU: usable.
    stored = cache.store(b"e1", _manifest(builder_optimization_level=5, workspace_bytes=1 << 30, onnx_sha256="c" * 64))
    found = cache.find_for_run(_query())
    assert found.entry is not None and found.entry.engine_path == stored.engine_path and found.rejected == ()

    assert cache.find_for_run(_query(precision="int8")).entry is None  # nothing built at int8
    assert cache.find_for_run(_query(model="gender/alpha")).rejected == ()  # other models are not candidates

    other_onnx = cache.find_for_run(_query(source_onnx_sha256="d" * 64))
    assert other_onnx.entry is None
    assert len(other_onnx.rejected) == 1 and "built from another ONNX" in other_onnx.rejected[0]

    other_gpu = cache.find_for_run(_query(target=A100))
    assert other_gpu.entry is None and "GPU: engine built on 'NVIDIA H100 80GB HBM3'" in other_gpu.rejected[0]
    other_trt = cache.find_for_run(_query(target=dataclasses.replace(H100, tensorrt_version="10.13.0.35")))
    assert "TensorRT version: engine 11.4.0.1, installed 10.13.0.35" in other_trt.rejected[0]

    too_big = cache.find_for_run(_query(batch_size=128))
    assert too_big.entry is None and "batch profile 1..64 does not include batch size 128" in too_big.rejected[0]

    # One optimisation profile per execution context the run keeps in concurrent use.
    assert cache.find_for_run(_query(contexts=1)).entry.engine_path == stored.engine_path
    too_few = cache.find_for_run(_query(contexts=3))
    assert too_few.entry is None
    assert "built for 1 concurrent execution context(s) (one optimisation profile each), the run needs 3" in too_few.rejected[0]
    enough = cache.store(b"e3", _manifest(contexts=3))
    assert cache.find_for_run(_query(contexts=3)).entry.engine_path == enough.engine_path


def test_run_lookup_prefers_the_profile_tuned_nearest_the_batch_then_the_newest(tmp_path):
    cache = EngineCache(tmp_path)
    wide = cache.store(b"wide", _manifest(profile=_profile(1, 64, 256), built_at="2026-01-02T00:00:00+00:00"))
    near_old = cache.store(b"near-old", _manifest(profile=_profile(1, 16, 64), workspace_bytes=1 << 30,
                                                  built_at="2026-01-01T00:00:00+00:00"))
    near_new = cache.store(b"near-new", _manifest(profile=_profile(1, 16, 64), workspace_bytes=2 << 30,
                                                  built_at="2026-01-03T00:00:00+00:00"))
    assert cache.find_for_run(_query(batch_size=16)).entry.engine_path == near_new.engine_path
    assert cache.find_for_run(_query(batch_size=128)).entry.engine_path == wide.engine_path
    # A tampered engine is passed over with the reason, and the next best is used.
    near_new.engine_path.write_bytes(b"tampered")
    found = cache.find_for_run(_query(batch_size=16))
    assert found.entry.engine_path == near_old.engine_path
    assert any("modified after it was built" in r for r in found.rejected)


def test_run_lookup_of_a_model_that_runs_a_fixed_batch(tmp_path):
    """An engine of one batch size serves a run of any batch size (the executor feeds it
    pieces); a model that runs a fixed batch takes only an engine of that batch, never
    one built for a range (its rows are not independent at other sizes)."""
    cache = EngineCache(tmp_path)
    ranged = cache.store(b"ranged", _manifest())  # 1..64
    one = cache.store(b"one", _manifest(profile=_profile(1, 1, 1)))
    assert cache.find_for_run(_query(batch_size=32)).entry.engine_path == ranged.engine_path
    assert cache.find_for_run(_query(batch_size=128)).entry.engine_path == one.engine_path  # in pieces of 1
    pinned = cache.find_for_run(_query(batch_size=32, fixed_batch=1))
    assert pinned.entry.engine_path == one.engine_path
    assert any("is not the fixed batch 1 the model runs" in r for r in pinned.rejected)
    assert cache.find_for_run(_query(batch_size=32, fixed_batch=4)).entry is None
    # an engine whose range admits the batch size goes first, however near 1,1,1's opt is
    for batch in (2, 4, 16, 64):  # (at batch 1 both admit it, and 1,1,1 is tuned for it)
        assert cache.find_for_run(_query(batch_size=batch)).entry.engine_path == ranged.engine_path
    big = cache.store(b"big", _manifest(profile=_profile(128, 128, 128)))
    assert cache.find_for_run(_query(batch_size=100)).entry.engine_path == big.engine_path  # padded beats 100 pieces


def test_run_lookup_never_serves_an_engine_whose_source_onnx_is_not_recorded(tmp_path):
    """A manifest without ``source_onnx_sha256`` (written by hand or by another tool) says
    nothing of which model the engine computes: passed over, with the reason."""
    cache = EngineCache(tmp_path)
    cache.store(b"unknown-source", _manifest(source_onnx_sha256=""))
    found = cache.find_for_run(_query())
    assert found.entry is None
    assert len(found.rejected) == 1 and "built from another ONNX (sha256 '?'" in found.rejected[0]
