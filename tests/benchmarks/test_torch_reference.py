"""benchmarks.torch_reference: what the reference pipeline's timed passes contain."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import benchmarks.torch_reference as ref  # noqa: E402
from benchmarks.config import Precision  # noqa: E402
from engine.specs import SpecRegistry, Task  # noqa: E402


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_a_warm_up_leaves_no_decoding_to_the_next_pass(tmp_path, monkeypatch, workers):
    """A warm-up of one batch, then a full pass: the full pass decodes each image once
    and nothing more. Without the drain, a persistent-worker DataLoader finishes the
    batches its workers had prefetched (here the whole epoch) inside the next pass.
    Decodes are counted in a file the forked workers append to."""
    paths = [_png(tmp_path / f"{i:02d}.png", i * 20) for i in range(12)]
    log = tmp_path / "decodes.log"
    real = ref.ReferenceDataset.__getitem__

    def counted(self, index):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        return real(self, index)

    monkeypatch.setattr(ref.ReferenceDataset, "__getitem__", counted)
    spec, _ = _specs()
    with _cpu_pipe({spec.key: torch.nn.Identity()}, [spec], workers=workers, threads=1) as pipe:
        assert len(list(pipe.iterate(paths, [spec.key], limit=1))) == 1
        log.write_bytes(b"")
        batches = list(pipe.iterate(paths, [spec.key]))
        decoded = len(log.read_bytes())
    assert sum(len(b["index"]) for b in batches) == 12
    assert decoded == 12


def _png(path, value=100, size=(20, 30)):
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def _specs():
    registry = SpecRegistry.builtin()
    return registry.get(Task.GENDER), registry.get(Task.QUALITY)


def _cpu_pipe(models, specs, workers=0, batch_size=2, threads=None, precision=Precision.FP32):
    """On the CPU; FP16, which reference_configs offers on CUDA only, runs the same lines
    here (models and inputs channels_last, forward under float16 autocast)."""
    config = ref.ReferenceConfig("cpu", precision)
    threads = torch.get_num_threads() if threads is None else threads
    return ref.ReferencePipeline(config, models, specs, batch_size=batch_size, workers=workers, threads=threads)


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )


def test_without_torch_the_error_names_the_package(monkeypatch):
    from engine.errors import DependencyError

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(DependencyError) as info:
        ref._torch()
    assert info.value.package == "torch" and info.value.extra == "torch"


def test_configurations_per_device():
    assert ref.reference_configs("cpu") == [ref.ReferenceConfig("cpu", Precision.FP32)]
    fp32, fp16 = ref.reference_configs("cuda")
    assert (fp32.device, fp32.precision, fp16.device, fp16.precision) == ("cuda", Precision.FP32, "cuda", Precision.FP16)
    assert ref.reference_configs("cpu")[0].config_id == "reference/torch/cpu/fp32"
    assert (fp32.config_id, fp16.config_id) == ("reference/torch/cuda/fp32", "reference/torch/cuda/fp16")
    assert not fp32.channels_last and fp16.channels_last
    assert fp32.label().startswith("PyTorch eager on cuda, FP32") and "channels_last" not in fp32.label()
    assert "autocast FP16, channels_last" in fp16.label() and "FP32" not in fp16.label()


def test_card_views_use_each_cards_library():
    gender, quality = _specs()
    assert ref.card_views([gender, quality]) == [(gender.key, gender, "opencv"), (quality.key, quality, "pil")]


def test_dataset_items_are_the_card_views_and_bad_files_are_zeros(tmp_path):
    pytest.importorskip("cv2")
    from engine.preprocess.reference import reference_view

    gender, quality = _specs()
    good = _png(tmp_path / "good.png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    ds = ref.ReferenceDataset([good, broken, tmp_path / "missing.png"], ref.card_views([gender, quality]))
    assert len(ds) == 3
    item = ds[0]
    assert item["index"] == 0 and item["ok"] is True and set(item) == {"index", "ok", gender.key, quality.key}
    for spec, library in ((gender, "opencv"), (quality, "pil")):
        view = item[spec.key]
        assert view.dtype == torch.float32 and view.shape == (3, spec.preprocess.size, spec.preprocess.size)
        assert np.array_equal(view.numpy(), reference_view(good.read_bytes(), spec.preprocess, library))
    for index in (1, 2):  # undecodable, unreadable: counted as not ok, zero views of the right shape
        item = ds[index]
        assert item["index"] == index and item["ok"] is False and set(item) == {"index", "ok", gender.key, quality.key}
        for spec in (gender, quality):
            view = item[spec.key]
            assert view.dtype == torch.float32 and view.shape == (3, spec.preprocess.size, spec.preprocess.size)
            assert not view.any()


def test_reference_models_have_the_engines_random_weights():
    from builders.export import build_random_model
    from engine.models import RANDOM_SEED

    gender, _ = _specs()
    assert ref.REFERENCE_SEED == RANDOM_SEED
    (model,) = ref.build_reference_models([gender]).values()
    expected = build_random_model(gender.architecture, gender.num_classes, RANDOM_SEED).state_dict()
    got = model.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_pipeline_takes_its_models_in_eval_mode_and_sets_threads():
    gender, quality = _specs()
    model = _small_model()
    assert model.training
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        with _cpu_pipe({gender.key: model, quality.key: torch.nn.Identity()}, [gender], threads=want) as pipe:
            assert torch.get_num_threads() == want
            assert list(pipe.models) == [gender.key]  # models of other specs are left out
            assert pipe.models[gender.key] is model and not model.training  # CPU: the shared module, no copy
            assert model[0].weight.is_contiguous()  # FP32: the default memory format, not channels_last
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="no reference model for"):
        _cpu_pipe({gender.key: model}, [gender, quality])


def test_infer_is_the_softmax_of_the_fp32_forward():
    gender, _ = _specs()
    model = _small_model()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with _cpu_pipe({gender.key: model}, [gender]) as pipe:
        probs = pipe.infer(gender.key, x)
        pipe.synchronize()  # on the CPU: nothing to wait for, and no CUDA call
        with torch.no_grad():
            expected = torch.softmax(model(x), dim=1).numpy()
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape == (3, 4)
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert seen[0] is True  # FP32 input in the default memory format


def test_loader_batches_in_order_and_only_the_asked_views(tmp_path):
    gender, quality = _specs()
    paths = [_png(tmp_path / f"{i}.png", i * 40) for i in range(5)]
    models = {gender.key: torch.nn.Identity(), quality.key: torch.nn.Identity()}
    with _cpu_pipe(models, [gender, quality]) as pipe:
        loader = pipe.loader(paths, [gender.key])
        assert pipe.loader(paths, [gender.key]) is loader  # kept: one loader per view set
        assert not loader.pin_memory  # pinning is for copies to a GPU
        batches = list(pipe.iterate(paths, [gender.key]))
        assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
        assert all(set(b) == {"index", "ok", gender.key} for b in batches)  # the quality view is not decoded
        assert list(pipe.iterate(paths, [gender.key], limit=0)) == []
        both = pipe.loader(paths, [gender.key, quality.key])
        assert both is not loader and pipe.loader(paths, [gender.key, quality.key]) is both
        batches = list(pipe.iterate(paths, [gender.key, quality.key]))
        assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
        for b in batches:  # each view at its own card's size
            assert set(b) == {"index", "ok", gender.key, quality.key}
            for spec in (gender, quality):
                assert b[spec.key].shape[1:] == (3, spec.preprocess.size, spec.preprocess.size)


def test_a_warm_up_without_workers_decodes_only_its_batches(tmp_path, monkeypatch):
    gender, _ = _specs()
    paths = [_png(tmp_path / f"{i}.png", i * 20) for i in range(8)]
    decoded = []
    real = ref.ReferenceDataset.__getitem__
    monkeypatch.setattr(ref.ReferenceDataset, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))
    with _cpu_pipe({gender.key: torch.nn.Identity()}, [gender]) as pipe:
        assert len(list(pipe.iterate(paths, [gender.key], limit=1))) == 1
    assert decoded == [0, 1]  # its one batch of 2, not the next one nor the rest of the epoch


def test_close_stops_the_persistent_workers(tmp_path):
    gender, _ = _specs()
    paths = [_png(tmp_path / f"{i}.png", i * 40) for i in range(4)]
    with _cpu_pipe({gender.key: torch.nn.Identity()}, [gender], workers=2) as pipe:
        loader = pipe.loader(paths, [gender.key])
        assert (loader.num_workers, loader.persistent_workers) == (2, True)
        assert sum(len(b["index"]) for b in pipe.iterate(paths, [gender.key])) == 4
        workers = list(loader._iterator._workers)
        assert workers and all(w.is_alive() for w in workers)
    assert not any(w.is_alive() for w in workers)  # stopped on exit, not left to garbage collection
    assert pipe.loader(paths, [gender.key]) is not loader  # and the closed loader is not handed out again


def test_fp16_is_autocast_float16_on_channels_last_with_fp32_probabilities():
    gender, _ = _specs()
    model = _small_model()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), dim=1).numpy()
    seen = {}

    def pre(m, args):
        seen["channels_last_input"] = args[0].is_contiguous(memory_format=torch.channels_last)
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["autocast_dtype"] = torch.get_autocast_dtype("cpu")

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(lambda m, args, out: seen.__setitem__("logits_dtype", out.dtype))
    before = torch.get_num_threads()
    try:
        with _cpu_pipe({gender.key: model}, [gender], precision=Precision.FP16) as pipe:
            weight = pipe.models[gender.key][0].weight
            assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            probs = pipe.infer(gender.key, x)  # a default-format host batch, as the loader gives
    finally:
        torch.set_num_threads(before)
    assert seen == {
        "channels_last_input": True,
        "autocast": True,
        "autocast_dtype": torch.float16,
        "logits_dtype": torch.float16,
    }
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32 and probs.shape == (3, 4)  # softmax in FP32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs, expected, atol=5e-3)  # the FP32 result, to FP16 precision


def test_worker_loaders_prefetch_two_batches_per_worker(tmp_path):
    gender, _ = _specs()
    paths = [_png(tmp_path / f"{i}.png", i * 40) for i in range(2)]
    with _cpu_pipe({gender.key: torch.nn.Identity()}, [gender], workers=1) as pipe:
        assert pipe.loader(paths, [gender.key]).prefetch_factor == 2
    with _cpu_pipe({gender.key: torch.nn.Identity()}, [gender], workers=0) as pipe:
        assert pipe.loader(paths, [gender.key]).prefetch_factor is None  # no workers: nothing prefetched


def test_a_loader_is_over_the_paths_it_is_asked_for(tmp_path):
    """The same views over other files: a loader of its own, not the earlier one's files."""
    gender, _ = _specs()
    paths = [_png(tmp_path / f"{i}.png", i * 40) for i in range(4)]
    with _cpu_pipe({gender.key: torch.nn.Identity()}, [gender]) as pipe:
        assert [b["index"].tolist() for b in pipe.iterate(paths[:2], [gender.key])] == [[0, 1]]
        assert [b["index"].tolist() for b in pipe.iterate(paths, [gender.key])] == [[0, 1], [2, 3]]
        assert pipe.loader(paths, [gender.key]) is pipe.loader(list(paths), [gender.key])  # kept per set of paths


def test_the_dataset_loads_in_workers_started_afresh(tmp_path):
    """Workers started by forkserver (Python 3.14's default on Linux) or spawn get the
    dataset pickled, not forked: it must pickle, and import afresh, to the same items."""
    _, quality = _specs()
    paths = [_png(tmp_path / f"{i}.png", 60 * i) for i in range(3)]
    dataset = ref.ReferenceDataset(paths, ref.card_views([quality]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context="forkserver")
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    views = torch.cat([b[quality.key] for b in batches])
    assert all(bool(ok) for b in batches for ok in b["ok"])
    assert torch.equal(views, torch.stack([dataset[i][quality.key] for i in range(3)]))
