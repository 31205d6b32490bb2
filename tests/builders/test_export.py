"""ONNX export of the real architectures: parity with PyTorch, dynamic batch,
metadata, checkpoints. The random-weight resnet18 and caformer_s36 exports come from
the session fixture ``random_models`` (seed 0), so each is exported once per session."""

from __future__ import annotations

import json
import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from builders.export import (  # noqa: E402
    build_random_model,
    build_torch_model,
    export_onnx,
    file_sha256,
    load_checkpoint,
)
from builders.onnx_io import inspect_onnx  # noqa: E402
from engine.errors import ModelError  # noqa: E402
from engine.specs import Architecture, SpecRegistry  # noqa: E402

SPECS = SpecRegistry.builtin()
LOGIT_TOLERANCE = 1e-3


def _ort_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_run(path, x: np.ndarray) -> np.ndarray:
    return _ort_session(path).run(["output"], {"input": x})[0]


def _torch_run(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _images(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _check_parity(onnx_path, torch_model, size: int, classes: int) -> None:
    sess = _ort_session(onnx_path)
    for batch in (2, 3):  # two batch sizes other than the export's example batch of 1
        x = _images(batch, size, seed=batch)
        got, want = sess.run(["output"], {"input": x})[0], _torch_run(torch_model, x)
        assert got.shape == want.shape == (batch, classes)
        diff = float(np.abs(got - want).max())
        assert diff < LOGIT_TOLERANCE, f"batch {batch}: max abs diff {diff}"
        # The comparison means something only if the samples give different outputs.
        assert float(np.abs(want - want[0]).max()) > 10 * LOGIT_TOLERANCE


@pytest.mark.parametrize("key", ["gender/alpha", "quality/baseline"], ids=["resnet18", "caformer_s36"])
def test_random_export_matches_pytorch_at_two_batch_sizes(random_models, key):
    resolved = random_models[key]
    spec = resolved.spec
    info = inspect_onnx(resolved.onnx_path)
    assert info.input.name == "input" and info.output.name == "output"
    assert info.input.shape == (None, 3, spec.preprocess.size, spec.preprocess.size)
    assert info.output.shape[1] == spec.num_classes
    assert info.opset == 17
    reference = build_random_model(spec.architecture, spec.num_classes, seed=0)
    _check_parity(resolved.onnx_path, reference, spec.preprocess.size, spec.num_classes)


@pytest.mark.parametrize("key", ["gender/alpha", "quality/baseline"], ids=["resnet18", "caformer_s36"])
def test_random_export_metadata(random_models, key):
    resolved = random_models[key]
    spec = resolved.spec
    meta = inspect_onnx(resolved.onnx_path).metadata
    assert meta["engine.task"] == spec.task.value
    assert meta["engine.variant"] == spec.variant
    assert meta["engine.architecture"] == spec.architecture.value
    assert meta["engine.weights"] == "random"
    assert meta["engine.weights_detail"] == "random weights, seed 0 - NOT the published model"
    assert meta["engine.output_kind"] == "logits"
    assert json.loads(meta["engine.labels"]) == list(spec.labels)
    assert meta["engine.torch_version"] == torch.__version__
    # One self-contained file: no weights stored outside it.
    proto = onnx.load(str(resolved.onnx_path), load_external_data=False)
    assert proto.graph.initializer
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_build_random_model_is_seeded_and_keeps_global_rng():
    torch.manual_seed(1234)
    before = torch.rand(1)
    torch.manual_seed(1234)
    a = build_random_model(Architecture.RESNET18, 2, seed=5)
    after = torch.rand(1)
    b = build_random_model(Architecture.RESNET18, 2, seed=5)
    c = build_random_model(Architecture.RESNET18, 2, seed=6)
    assert torch.equal(before, after)
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert not a.training


@pytest.fixture(scope="module")
def resnet18_state():
    """A resnet18 (2 classes) with seeded random weights, its state dict."""
    model = build_random_model(Architecture.RESNET18, 2, seed=123)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_round_trip_safetensors(tmp_path, resnet18_state):
    from safetensors.torch import save_file

    model, state = resnet18_state
    ckpt = tmp_path / "gender.safetensors"
    save_file(state, str(ckpt))
    out = export_onnx(SPECS.get("gender", "alpha"), tmp_path / "ckpt.onnx", checkpoint=ckpt)
    meta = inspect_onnx(out).metadata
    assert meta["engine.weights"] == "checkpoint"
    assert meta["engine.weights_detail"] == f"checkpoint sha256:{file_sha256(ckpt)}"
    x = _images(2, 224, seed=7)
    diff = float(np.abs(_ort_run(out, x) - _torch_run(model, x)).max())
    assert diff < LOGIT_TOLERANCE


def test_checkpoint_round_trip_pt_with_module_prefix_and_softmax(tmp_path, resnet18_state):
    model, state = resnet18_state
    ckpt = tmp_path / "gender.pt"
    torch.save({"module." + k: v for k, v in state.items()}, ckpt)
    out = export_onnx(SPECS.get("gender", "alpha"), tmp_path / "p.onnx", checkpoint=ckpt, probabilities=True)
    assert inspect_onnx(out).metadata["engine.output_kind"] == "probabilities"
    x = _images(3, 224, seed=8)
    got = _ort_run(out, x)
    want = torch.softmax(torch.from_numpy(_torch_run(model, x)), dim=1).numpy()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert float(np.abs(got - want).max()) < 1e-4


def test_load_checkpoint_nested_state_dict_and_model_prefix(tmp_path, resnet18_state):
    _, state = resnet18_state
    ckpt = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "state_dict": {"model." + k: v for k, v in state.items()}}, ckpt)
    fresh = build_random_model(Architecture.RESNET18, 2, seed=999)
    assert not torch.equal(fresh.fc.weight, state["fc.weight"])
    load_checkpoint(fresh, ckpt)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_checkpoint_for_wrong_architecture_is_model_error(tmp_path, resnet18_state):
    from safetensors.torch import save_file

    _, state = resnet18_state
    ckpt = tmp_path / "r18.safetensors"
    save_file(state, str(ckpt))
    out = tmp_path / "beta.onnx"
    with pytest.raises(ModelError) as err:
        export_onnx(SPECS.get("gender", "beta"), out, checkpoint=ckpt)  # beta is resnet50
    msg = str(err.value)
    assert "resnet50" in msg and "missing" in msg and "layer1.0.conv3.weight" in msg
    assert "\n" not in msg
    assert not out.exists()


def test_checkpoint_with_wrong_class_count_names_the_shapes(tmp_path):
    state = build_torch_model(Architecture.RESNET18, 4).state_dict()
    ckpt = tmp_path / "four.pt"
    torch.save(state, ckpt)
    with pytest.raises(ModelError, match=r"fc\.weight \(4, 512\) vs \(2, 512\)"):
        load_checkpoint(build_torch_model(Architecture.RESNET18, 2), ckpt)


class _NotATensor:
    pass


@pytest.mark.parametrize(
    "name, content",
    [
        ("garbage.pt", b"not a checkpoint"),
        # bytes torch's weights-only unpickler trips over with non-pickle errors
        ("text.pt", b"hi\n"),  # KeyError: 105 (a memo lookup)
        ("reduce.pth", b"R"),  # IndexError: pop from empty list
        ("short.bin", b"j8"),  # struct.error: unpack requires a buffer of 4 bytes
        ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"),
        ("weights.h5", b"whatever"),
    ],
)
def test_unreadable_checkpoints_are_model_errors(tmp_path, name, content):
    ckpt = tmp_path / name
    ckpt.write_bytes(content)
    with pytest.raises(ModelError) as err:
        load_checkpoint(build_torch_model(Architecture.RESNET18, 2), ckpt)
    assert str(ckpt) in str(err.value) and "\n" not in str(err.value)
    assert "more than plain tensors" not in str(err.value)  # corrupt, not unsafe


def test_a_text_file_as_checkpoint_is_a_one_line_cli_error(tmp_path, capsys):
    from engine.cli import main

    ckpt = tmp_path / "garbage.pt"
    ckpt.write_text("hi\n")
    assert main(["export", "gender", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("engine: error:") and "\n" not in err and "not a readable PyTorch file" in err
    assert "Traceback" not in err and not (tmp_path / "x.onnx").exists()


def test_export_into_a_missing_folder_is_refused_and_makes_none(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "typo" / "deeper" / "x.onnx"
    assert main(["export", "gender", "--random-weights", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"engine: error: output folder does not exist: {out.parent}"
    assert not (tmp_path / "typo").exists()


def test_a_folder_given_as_checkpoint_says_so(tmp_path):
    with pytest.raises(ModelError, match="is a folder"):
        load_checkpoint(build_torch_model(Architecture.RESNET18, 2), tmp_path)


def test_pickled_objects_are_refused(tmp_path):
    ckpt = tmp_path / "unsafe.pt"
    torch.save({"fc.weight": torch.zeros(2, 512), "cfg": _NotATensor()}, ckpt)
    with pytest.raises(ModelError, match="weights_only") as err:
        load_checkpoint(build_torch_model(Architecture.RESNET18, 2), ckpt)
    assert "\x1b" not in str(err.value) and "more than plain tensors" in str(err.value)
    whole = tmp_path / "module.pt"
    torch.save(build_torch_model(Architecture.RESNET18, 2), whole)  # a pickled module, not a state dict
    with pytest.raises(ModelError, match="state_dict"):
        load_checkpoint(build_torch_model(Architecture.RESNET18, 2), whole)


def test_export_needs_exactly_one_weight_source(tmp_path):
    spec = SPECS.get("gender", "alpha")
    with pytest.raises(ModelError, match="exactly one"):
        export_onnx(spec, tmp_path / "x.onnx")
    with pytest.raises(ModelError, match="exactly one"):
        export_onnx(spec, tmp_path / "x.onnx", checkpoint=tmp_path / "c.pt", random_seed=0)
    with pytest.raises(ModelError, match="does not exist"):
        export_onnx(spec, tmp_path / "x.onnx", checkpoint=tmp_path / "c.pt")


@pytest.mark.parametrize(
    "out, opset, message",
    [
        ("DIR", 17, "is a folder"),
        ("a_file/x.onnx", 17, "cannot make the folder"),
        ("x.onnx", 5, "opset must be 13..20"),
        ("x.onnx", 99, "opset must be 13..20"),
    ],
)
def test_export_checks_its_output_and_opset_before_exporting(tmp_path, out, opset, message):
    spec = SpecRegistry.builtin().get("gender")
    (tmp_path / "a_file").write_text("in the way")
    target = tmp_path if out == "DIR" else tmp_path / out
    with pytest.raises(ModelError, match=message):
        export_onnx(spec, target, random_seed=0, opset=opset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_never_replaces_a_device_or_fifo_and_writes_through_a_symlink(tmp_path):
    import os

    spec = SpecRegistry.builtin().get("gender")
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="is not a regular file"):
        export_onnx(spec, fifo, random_seed=0)
    assert fifo.is_fifo()
    link, target = tmp_path / "link.onnx", tmp_path / "models" / "real.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert export_onnx(spec, link, random_seed=0) == target
    assert link.is_symlink() and inspect_onnx(link).input.shape[1:] == (3, 224, 224)


class _TinyNet(torch.nn.Module):
    """A stand-in for the architecture: a convolution, pooling and a linear head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))


@pytest.fixture()
def tiny_architecture(monkeypatch):
    """export_onnx on a tiny network in place of the real one: seconds, not a minute."""
    import builders.export as export

    def build(architecture, num_classes, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _TinyNet(num_classes).eval()

    monkeypatch.setattr(export, "build_random_model", build)
    return build


@pytest.mark.parametrize("opset", [13, 20])  # the oldest and the newest an export may ask for
def test_export_honours_the_opset_and_keeps_input_and_output_batch_dynamic(tmp_path, tiny_architecture, opset):
    spec = SPECS.get("gender", "alpha")
    out = export_onnx(spec, tmp_path / "tiny.onnx", random_seed=3, opset=opset)
    info = inspect_onnx(out)
    assert info.opset == opset
    assert info.input.shape == (None, 3, 224, 224) and info.output.shape == (None, spec.num_classes)
    x = _images(3, 224, seed=1)
    np.testing.assert_allclose(_ort_run(out, x), _torch_run(tiny_architecture(None, spec.num_classes, 3), x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant, opset", [("alpha", 13), ("beta", 20)])
def test_the_export_command_passes_its_variant_and_opset_on(tmp_path, tiny_architecture, capsys, variant, opset):
    from engine.cli import main

    out = tmp_path / "g.onnx"
    assert main(["export", "gender", "--variant", variant, "--random-weights", "--opset", str(opset),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}  (RANDOM weights: not the published model)"
    info = inspect_onnx(out)
    assert info.opset == opset and (info.metadata["engine.task"], info.metadata["engine.variant"]) == ("gender", variant)


def test_a_fixed_batch_export_is_refused_as_an_exporter_regression(tmp_path, tiny_architecture, monkeypatch):
    import builders.export as export

    def fixed_batch_export(torch, module, dummy, opset):
        import io
        import warnings

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(module, (dummy,), buffer, input_names=["input"], output_names=["output"],
                              opset_version=opset, dynamo=False)  # no dynamic axes: batch pinned at 1
        return buffer.getvalue()

    monkeypatch.setattr(export, "_torchscript_export", fixed_batch_export)
    with pytest.raises(RuntimeError, match="produced a fixed batch"):
        export_onnx(SPECS.get("gender", "alpha"), tmp_path / "fixed.onnx", random_seed=0)


def test_load_checkpoint_strips_nested_wrapper_prefixes(tmp_path, resnet18_state):
    _, state = resnet18_state
    ckpt = tmp_path / "wrapped_ddp.pt"  # a training wrapper ("model.") around DistributedDataParallel ("module.")
    torch.save({"model.module." + k: v for k, v in state.items()}, ckpt)
    fresh = build_random_model(Architecture.RESNET18, 2, seed=999)
    load_checkpoint(fresh, ckpt)
    assert torch.equal(fresh.fc.weight, state["fc.weight"])
