"""Model resolution: which file a run uses, what it reports about the weights, and the
checks against the spec. Most cases use tiny hand-built ONNX graphs; the random-weight
exports come from the session fixture."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

import engine.models as models
from builders.onnx_io import inspect_onnx
from engine.errors import ModelError
from engine.models import ModelSource, ResolvedModel, WeightsKind, default_cache_dir, resolve_model
from engine.specs import OutputKind, SpecRegistry
from tests.model_fixtures import make_tiny_classifier

SPECS = SpecRegistry.builtin()
GENDER = SPECS.get("gender", "alpha")  # 224 px, 2 labels, published output: probabilities
QUALITY = SPECS.get("quality", "baseline")


def _published_file(cache_dir: Path, spec) -> Path:
    return cache_dir / "published" / spec.hub.repo / spec.hub.filename


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to reach the hub."""

    def refuse(*args, **kwargs):
        raise AssertionError("download_published must not be called")

    monkeypatch.setattr(models, "download_published", refuse)


@pytest.fixture
def count_exports(monkeypatch):
    calls = []
    real = models.export_onnx

    def counting(*args, **kwargs):
        calls.append(args[0].key)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "export_onnx", counting)
    return calls


# ---------------------------------------------------------------- basics


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ENGINE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "anime-batch-engine"


def test_cache_dir_variable_expands_a_tilde_and_a_blank_one_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ENGINE_CACHE_DIR", "~/models")
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.setenv("ENGINE_CACHE_DIR", "  ")
    assert default_cache_dir() == tmp_path / ".cache" / "anime-batch-engine"


def test_model_source_expands_a_tilde_in_the_files_it_names(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ModelSource(onnx="~/m.onnx").onnx == tmp_path / "m.onnx"
    assert ModelSource(checkpoint=Path("~/c.safetensors")).checkpoint == tmp_path / "c.safetensors"


def test_model_source_takes_one_source_of_weights(tmp_path):
    with pytest.raises(ModelError, match="an ONNX file and random weights"):
        ModelSource(onnx=tmp_path / "m.onnx", random_weights=True)
    with pytest.raises(ModelError, match="an ONNX file and a checkpoint"):
        ModelSource(onnx=tmp_path / "m.onnx", checkpoint=tmp_path / "c.pt")
    src = ModelSource(onnx=str(tmp_path / "m.onnx"))
    assert src.onnx == tmp_path / "m.onnx"
    with pytest.raises(dataclasses.FrozenInstanceError):
        src.download = False


# ---------------------------------------------------------------- resolution order


def test_user_onnx_wins_and_nothing_is_downloaded(tmp_path, no_download):
    path = make_tiny_classifier(tmp_path / "mine.onnx", size=224, classes=2)
    resolved = resolve_model(GENDER, ModelSource(onnx=path, download=True), tmp_path / "cache")
    assert isinstance(resolved, ResolvedModel)
    assert resolved.weights is WeightsKind.USER_ONNX and not resolved.is_random
    assert resolved.onnx_path == path
    assert str(path) in resolved.weights_detail
    # No engine metadata: the spec's output kind applies.
    assert resolved.output_kind is OutputKind.PROBABILITIES
    assert resolved.info.input.shape == (None, 3, 224, 224)


def test_metadata_output_kind_wins_over_the_spec(tmp_path):
    path = make_tiny_classifier(tmp_path / "m.onnx", size=224, classes=2, metadata={"engine.output_kind": "logits"})
    resolved = resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    assert GENDER.output is OutputKind.PROBABILITIES
    assert resolved.output_kind is OutputKind.LOGITS


def test_dims_left_dynamic_besides_the_batch_are_pinned_to_the_spec(tmp_path):
    """A user's ONNX with dynamic height, width and classes: the streamed executor
    allocates its buffers from these shapes (and refused such a model before)."""
    import numpy as np
    import onnx

    from engine.frames import FrameClassifier

    path = make_tiny_classifier(tmp_path / "dyn.onnx", size=224, classes=2, metadata={"engine.output_kind": "logits"})
    model = onnx.load(str(path))
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    out_dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    out_dim.ClearField("dim_value")
    out_dim.dim_param = "classes"
    onnx.save(model, str(path))
    assert inspect_onnx(path).input.shape == (None, 3, None, None)

    resolved = resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    assert resolved.info.input.shape == (None, 3, 224, 224) and resolved.info.output.shape == (None, 2)
    frames = np.random.default_rng(0).integers(0, 256, (3, 90, 70, 3), dtype=np.uint8)
    with FrameClassifier([resolved], batch_size=2, streamed=True) as classifier:
        streamed = classifier.classify(frames)[GENDER.key]
    with FrameClassifier([resolved], batch_size=2) as classifier:
        plain = classifier.classify(frames)[GENDER.key]
    np.testing.assert_allclose(streamed.probabilities, plain.probabilities, rtol=1e-6, atol=1e-7)


def test_missing_user_onnx_is_one_line_error(tmp_path):
    with pytest.raises(ModelError, match=r"gender/alpha: ONNX file .*nope\.onnx does not exist"):
        resolve_model(GENDER, ModelSource(onnx=tmp_path / "nope.onnx"), tmp_path)


def test_published_file_from_the_cache(tmp_path, no_download):
    cache = tmp_path / "cache"
    make_tiny_classifier(_published_file(cache, GENDER), size=224, classes=2)
    resolved = resolve_model(GENDER, ModelSource(), cache)
    assert resolved.weights is WeightsKind.PUBLISHED
    assert resolved.onnx_path == _published_file(cache, GENDER)
    assert GENDER.published_as in resolved.weights_detail


def test_published_missing_and_download_off_says_what_to_pass(tmp_path, no_download):
    with pytest.raises(ModelError) as err:
        resolve_model(GENDER, ModelSource(download=False), tmp_path)
    msg = str(err.value)
    assert "--gender-onnx FILE" in msg and "--gender-checkpoint FILE" in msg and "--random-weights" in msg
    assert "\n" not in msg


def test_offline_download_is_a_clean_model_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stray copy from a real hub cache
    with pytest.raises(ModelError) as err:
        resolve_model(QUALITY, ModelSource(download=True), tmp_path / "cache")
    msg = str(err.value)
    assert msg.startswith("could not download deepghs-cv/cls-bangumibase-face-quality.caformer_s36/model.onnx")
    assert "--quality-onnx FILE" in msg and "--random-weights" in msg
    assert "\n" not in msg


def test_spec_without_hub_file(tmp_path):
    spec = dataclasses.replace(GENDER, variant="mine", hub=None)
    with pytest.raises(ModelError, match="gender/mine has no published file"):
        resolve_model(spec, ModelSource(), tmp_path)


# ---------------------------------------------------------------- checks against the spec


def test_input_size_mismatch(tmp_path):
    path = make_tiny_classifier(tmp_path / "m.onnx", size=100, classes=2)
    with pytest.raises(ModelError, match=r"shape \(\?, 3, 100, 100\), but the spec expects \(N, 3, 224, 224\)"):
        resolve_model(GENDER, ModelSource(onnx=path), tmp_path)


def test_class_count_mismatch(tmp_path):
    path = make_tiny_classifier(tmp_path / "m.onnx", size=224, classes=3)
    with pytest.raises(ModelError, match=r"\(\?, 3\), but the spec has 2 labels \['female', 'male'\]"):
        resolve_model(GENDER, ModelSource(onnx=path), tmp_path)


def test_quality_onnx_given_for_gender(tmp_path, random_models):
    with pytest.raises(ModelError, match="gender/alpha"):
        resolve_model(GENDER, ModelSource(onnx=random_models["quality/baseline"].onnx_path), tmp_path)


# ---------------------------------------------------------------- fixed batch


def test_fixed_batch_is_made_dynamic_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = make_tiny_classifier(tmp_path / "b1.onnx", size=224, classes=2, batch=1)
    calls = []
    real = models.make_batch_dynamic
    monkeypatch.setattr(models, "make_batch_dynamic", lambda *a, **k: calls.append(a) or real(*a, **k))

    first = resolve_model(GENDER, ModelSource(onnx=path), cache)
    assert first.info.input.fixed_batch is None
    assert first.onnx_path.parent == cache / "dynamic"
    assert first.weights is WeightsKind.USER_ONNX
    second = resolve_model(GENDER, ModelSource(onnx=path), cache)
    assert second.onnx_path == first.onnx_path
    assert len(calls) == 1
    assert not (cache / "batching").exists()  # make_batch_dynamic verified the copy; not probed again


def test_unbatchable_graph_keeps_its_fixed_batch(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = make_tiny_classifier(tmp_path / "b1.onnx", size=224, classes=2, batch=1, hardcoded_reshape=True)
    calls = []
    real = models.make_batch_dynamic
    monkeypatch.setattr(models, "make_batch_dynamic", lambda *a, **k: calls.append(a) or real(*a, **k))

    first = resolve_model(GENDER, ModelSource(onnx=path), cache)
    assert first.onnx_path == path
    assert first.info.input.fixed_batch == 1
    second = resolve_model(GENDER, ModelSource(onnx=path), cache)
    assert second.info.input.fixed_batch == 1
    assert len(calls) == 1  # the verdict is remembered
    assert not list((cache / "dynamic").glob("*.onnx"))


# ---------------------------------------------------------------- random weights and checkpoints


@pytest.mark.parametrize("key", ["gender/alpha", "quality/baseline"])
def test_random_models_are_reported_as_random(random_models, key):
    resolved = random_models[key]
    assert resolved.spec.key == key
    assert resolved.weights is WeightsKind.RANDOM and resolved.is_random
    assert "NOT the published model" in resolved.weights_detail
    assert resolved.output_kind is OutputKind.LOGITS  # our export's metadata beats the spec
    assert resolved.info.input.fixed_batch is None
    assert resolved.onnx_path.is_file()


def test_random_onnx_passed_as_user_onnx_is_still_random(tmp_path, random_models):
    copy = tmp_path / "looks_published.onnx"
    shutil.copyfile(random_models["gender/alpha"].onnx_path, copy)
    resolved = resolve_model(GENDER, ModelSource(onnx=copy), tmp_path / "cache")
    assert resolved.weights is WeightsKind.RANDOM and resolved.is_random
    assert "NOT the published model" in resolved.weights_detail


def test_random_onnx_in_the_published_cache_is_still_random(tmp_path, random_models, no_download):
    cache = tmp_path / "cache"
    target = _published_file(cache, GENDER)
    target.parent.mkdir(parents=True)
    shutil.copyfile(random_models["gender/alpha"].onnx_path, target)
    assert resolve_model(GENDER, ModelSource(), cache).weights is WeightsKind.RANDOM


def test_random_export_is_reused_from_the_cache(model_cache_dir, random_models, count_exports):
    first = random_models["gender/alpha"]  # exported (once) by the session fixture
    mtime = first.onnx_path.stat().st_mtime_ns
    again = resolve_model(GENDER, ModelSource(random_weights=True), model_cache_dir)
    assert count_exports == []
    assert again.onnx_path == first.onnx_path
    assert again.onnx_path.stat().st_mtime_ns == mtime


def test_checkpoint_is_exported_once_and_reported(tmp_path, count_exports):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from builders.export import build_random_model, file_sha256

    model = build_random_model(GENDER.architecture, 2, seed=42)
    ckpt = tmp_path / "gender.safetensors"
    save_file(model.state_dict(), str(ckpt))
    cache = tmp_path / "cache"

    first = resolve_model(GENDER, ModelSource(checkpoint=ckpt), cache)
    assert first.weights is WeightsKind.CHECKPOINT and not first.is_random
    assert f"sha256:{file_sha256(ckpt)}" in first.weights_detail
    assert first.output_kind is OutputKind.LOGITS
    assert first.onnx_path.parent == cache / "exports"
    assert inspect_onnx(first.onnx_path).metadata["engine.weights"] == "checkpoint"
    mtime = first.onnx_path.stat().st_mtime_ns

    second = resolve_model(GENDER, ModelSource(checkpoint=ckpt), cache)
    assert count_exports == ["gender/alpha"]
    assert second.onnx_path == first.onnx_path
    assert second.onnx_path.stat().st_mtime_ns == mtime

    # The exported file holds the checkpoint's weights.
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    got = ort.InferenceSession(str(first.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert float(np.abs(got - want).max()) < 1e-3


def test_missing_checkpoint(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(ModelError, match="checkpoint .*missing.pt does not exist"):
        resolve_model(GENDER, ModelSource(checkpoint=tmp_path / "missing.pt"), tmp_path)


# ---------------------------------------------------------------- more checks and the export cache


def test_a_folder_given_as_the_checkpoint_is_a_model_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ModelError, match=r"gender/alpha: checkpoint .*ckpt is a folder; name the checkpoint file in it"):
        resolve_model(GENDER, ModelSource(checkpoint=tmp_path / "ckpt"), tmp_path / "cache")


@pytest.fixture
def tiny_exports(monkeypatch):
    """export_onnx writing a tiny 224 px classifier with the metadata the real export
    writes (the real one takes seconds): the calls are recorded."""
    pytest.importorskip("torch", reason="an export's file name carries the torch version")
    from builders.export import META_OUTPUT_KIND, META_WEIGHTS, META_WEIGHTS_DETAIL, WEIGHTS_RANDOM, random_weights_detail

    calls = []

    def tiny_export(spec, path, *, checkpoint=None, random_seed=None):
        calls.append(Path(path))
        return make_tiny_classifier(path, size=224, classes=2, metadata={
            META_OUTPUT_KIND: "logits", META_WEIGHTS: WEIGHTS_RANDOM,
            META_WEIGHTS_DETAIL: random_weights_detail(random_seed)})

    monkeypatch.setattr(models, "export_onnx", tiny_export)
    return calls


@pytest.mark.parametrize("cached", ["other weights", "not an onnx file"])
def test_a_cached_export_of_other_weights_or_unreadable_is_exported_again(cached, tmp_path, tiny_exports):
    cache = tmp_path / "cache"
    first = resolve_model(GENDER, ModelSource(random_weights=True), cache)
    assert tiny_exports == [first.onnx_path] and first.weights is WeightsKind.RANDOM
    assert resolve_model(GENDER, ModelSource(random_weights=True), cache).onnx_path == first.onnx_path
    assert len(tiny_exports) == 1  # reused
    if cached == "other weights":
        make_tiny_classifier(first.onnx_path, size=224, classes=2, metadata={"engine.weights_detail": "seed 7"})
    else:
        first.onnx_path.write_bytes(b"half an onnx")
    again = resolve_model(GENDER, ModelSource(random_weights=True), cache)
    assert len(tiny_exports) == 2 and again.onnx_path == first.onnx_path
    assert inspect_onnx(again.onnx_path).metadata["engine.weights_detail"] == first.weights_detail


def _redeclared(path, *, input_dims=None, output_dims=None, input_type=None):
    """``path`` with its input/output declared otherwise (the nodes left as they are)."""
    import onnx

    model = onnx.load(str(path))
    for value, dims in ((model.graph.input[0], input_dims), (model.graph.output[0], output_dims)):
        if dims is not None:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for d in dims:
                shape.dim.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))
    if input_type is not None:
        model.graph.input[0].type.tensor_type.elem_type = input_type
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("dims, shown", [
    (["batch", 1, 224, 224], r"\(\?, 1, 224, 224\)"),
    (["batch", 3, 100, 224], r"\(\?, 3, 100, 224\)"),
    (["batch", 3, 224, 100], r"\(\?, 3, 224, 100\)"),
    (["batch", 3, 224], r"\(\?, 3, 224\)"),
])
def test_an_input_of_other_channels_height_width_or_rank_is_refused(dims, shown, tmp_path):
    path = _redeclared(make_tiny_classifier(tmp_path / "m.onnx", size=224, classes=2), input_dims=dims)
    with pytest.raises(ModelError, match=shown + r", but the spec expects \(N, 3, 224, 224\)"):
        resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")


def test_an_integer_input_or_an_output_of_other_rank_is_refused(tmp_path):
    from onnx import TensorProto

    path = _redeclared(make_tiny_classifier(tmp_path / "u8.onnx", size=224, classes=2), input_type=TensorProto.UINT8)
    with pytest.raises(ModelError, match="uint8 input; a float input is expected"):
        resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    path = _redeclared(make_tiny_classifier(tmp_path / "3d.onnx", size=224, classes=2), output_dims=["batch", 2, 1])
    with pytest.raises(ModelError, match=r"of shape \(\?, 2, 1\), but the spec has 2 labels"):
        resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")


def test_unknown_output_kind_or_other_labels_in_the_metadata_are_warned_about(tmp_path, caplog):
    path = make_tiny_classifier(tmp_path / "m.onnx", size=224, classes=2, metadata={
        "engine.output_kind": "scores", "engine.labels": '["man", "woman"]'})
    resolved = resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    assert resolved.output_kind is GENDER.output  # the spec's, not a guess
    assert "ignoring unknown engine.output_kind='scores'" in caplog.text
    assert "was exported with labels ['man', 'woman'], the spec says ['female', 'male']" in caplog.text


def test_the_batching_check_runs_once_per_file_and_its_verdict_is_kept(tmp_path, monkeypatch):
    import builders.onnx_io

    probes = []
    real = builders.onnx_io.batches_cleanly
    monkeypatch.setattr(builders.onnx_io, "batches_cleanly", lambda *a, **k: probes.append(a[0]) or real(*a, **k))
    clean = make_tiny_classifier(tmp_path / "clean.onnx", size=224, classes=2)
    baked = make_tiny_classifier(tmp_path / "baked.onnx", size=224, classes=2, batch=1, hardcoded_reshape=True)
    baked = _redeclared(baked, input_dims=["batch", 3, 224, 224], output_dims=["batch", 2])  # declared dynamic
    for _ in range(2):
        assert resolve_model(GENDER, ModelSource(onnx=clean), tmp_path / "cache").info.input.fixed_batch is None
        assert resolve_model(GENDER, ModelSource(onnx=baked), tmp_path / "cache").info.input.fixed_batch == 1
    assert probes == [clean, baked]


def test_no_source_given_means_the_published_file_downloaded_when_missing(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="^could not download "):  # tried, not refused as "downloading is off"
        resolve_model(GENDER, cache_dir=tmp_path / "cache")


def test_a_published_file_that_does_not_batch_cleanly_runs_one_image_at_a_time(tmp_path, no_download):
    cache = tmp_path / "cache"
    baked = make_tiny_classifier(_published_file(cache, GENDER), size=224, classes=2, batch=1, hardcoded_reshape=True)
    _redeclared(baked, input_dims=["batch", 3, 224, 224], output_dims=["batch", 2])  # declared dynamic
    resolved = resolve_model(GENDER, ModelSource(), cache)
    assert resolved.weights is WeightsKind.PUBLISHED and resolved.info.input.fixed_batch == 1


# ---------------------------------------------------------------- hashes, cache names and what is logged


def test_the_source_hash_is_read_from_the_file_where_resolving_did_not_read_it(tmp_path, tiny_exports):
    from builders.manifest import onnx_sha256

    exported = resolve_model(GENDER, ModelSource(random_weights=True), tmp_path / "cache")
    assert exported.known_sha256 is None  # our own export is not batch-checked: no hash read yet
    assert exported.source_sha256 == onnx_sha256(exported.onnx_path)
    path = make_tiny_classifier(tmp_path / "m.onnx", size=224)
    user = resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    assert user.source_sha256 == onnx_sha256(user.onnx_path)


def test_exports_of_specs_that_differ_only_in_input_size_do_not_share_a_cache_file(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="an export's file name carries the torch version")
    from builders.export import META_OUTPUT_KIND, META_WEIGHTS, META_WEIGHTS_DETAIL, WEIGHTS_RANDOM, random_weights_detail

    def sized_export(spec, path, *, checkpoint=None, random_seed=None):
        return make_tiny_classifier(path, size=spec.preprocess.size, classes=spec.num_classes, metadata={
            META_OUTPUT_KIND: "logits", META_WEIGHTS: WEIGHTS_RANDOM,
            META_WEIGHTS_DETAIL: random_weights_detail(random_seed)})

    monkeypatch.setattr(models, "export_onnx", sized_export)
    big = dataclasses.replace(GENDER, variant="big", preprocess=dataclasses.replace(GENDER.preprocess, size=256))
    small_model = resolve_model(GENDER, ModelSource(random_weights=True), tmp_path / "cache")
    big_model = resolve_model(big, ModelSource(random_weights=True), tmp_path / "cache")
    assert big_model.onnx_path != small_model.onnx_path
    assert big_model.info.input.shape == (None, 3, 256, 256)


def test_a_user_onnx_without_engine_metadata_resolves_without_a_warning(tmp_path, caplog):
    path = make_tiny_classifier(tmp_path / "plain.onnx", size=224, classes=2)
    with caplog.at_level("WARNING", logger="engine.models"):
        resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_a_user_onnx_of_random_weights_reports_its_own_seed(tmp_path):
    from builders.export import META_WEIGHTS, META_WEIGHTS_DETAIL, WEIGHTS_RANDOM, random_weights_detail

    path = make_tiny_classifier(tmp_path / "r7.onnx", size=224, classes=2, metadata={
        META_WEIGHTS: WEIGHTS_RANDOM, META_WEIGHTS_DETAIL: random_weights_detail(7)})
    resolved = resolve_model(GENDER, ModelSource(onnx=path), tmp_path / "cache")
    assert resolved.is_random and resolved.weights_detail == random_weights_detail(7)


def test_a_cache_dir_argument_expands_a_tilde(tmp_path, monkeypatch, tiny_exports):
    monkeypatch.setenv("HOME", str(tmp_path))
    resolved = resolve_model(GENDER, ModelSource(random_weights=True), "~/cache")
    assert resolved.onnx_path.parent == tmp_path / "cache" / "exports"


def test_random_weights_are_never_used_silently(tmp_path, caplog, tiny_exports):
    with caplog.at_level("WARNING", logger="engine.models"):
        resolve_model(GENDER, ModelSource(random_weights=True), tmp_path / "cache")
    assert "gender/alpha runs with RANDOM weights (random weights, seed 0 - NOT the published model)" in caplog.text


def test_an_export_that_cannot_be_written_is_one_line_naming_the_cache_variable(tmp_path, tiny_exports):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be\n")
    with pytest.raises(ModelError, match=r"^cannot write the exported model to .* \(set ENGINE_CACHE_DIR\)$"):
        resolve_model(GENDER, ModelSource(random_weights=True), blocked)
