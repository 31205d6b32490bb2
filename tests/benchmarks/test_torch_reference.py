"""benchmarks.torch_reference: what the reference pipeline's timed passes contain."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

import benchmarks.torch_reference as ref  # noqa: E402
from benchmarks.config import Precision  # noqa: E402
from engine.specs import SpecRegistry, Task  # noqa: E402


@pytest.mark.parametrize("workers", [0, 2])
def test_a_warm_up_leaves_no_decoding_to_the_next_pass(tmp_path, monkeypatch, workers):
    """A warm-up of one batch, then a full pass: the full pass decodes each image once
    and nothing more. Without the drain, a persistent-worker DataLoader finishes the
    batches its workers had prefetched (here the whole epoch) inside the next pass.
    Decodes are counted in a file the forked workers append to."""
    paths = []
    for i in range(12):
        p = tmp_path / f"{i:02d}.png"
        Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(p)
        paths.append(p)
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
    spec = SpecRegistry.builtin().get(Task.GENDER)
    config = ref.ReferenceConfig("cpu", Precision.FP32)
    with ref.ReferencePipeline(config, {spec.key: torch.nn.Identity()}, [spec], batch_size=2, workers=workers,
                               threads=1) as pipe:
        assert len(list(pipe.iterate(paths, [spec.key], limit=1))) == 1
        log.write_bytes(b"")
        batches = list(pipe.iterate(paths, [spec.key]))
        decoded = len(log.read_bytes())
    assert sum(len(b["index"]) for b in batches) == 12
    assert decoded == 12
