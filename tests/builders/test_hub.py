"""The published-model download on a machine without network: one line, at once."""

from __future__ import annotations

import time

import pytest

from builders.hub import _hub_resolves, download_published
from engine.errors import ModelError
from engine.specs import SpecRegistry


def test_no_network_fails_fast_with_one_line(tmp_path, monkeypatch, caplog):
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if _hub_resolves():
        pytest.skip("the hub's address resolves here: this test is for machines without network")
    spec = SpecRegistry.builtin().get("gender")
    start = time.monotonic()
    with pytest.raises(ModelError) as exc:
        download_published(spec, tmp_path)
    assert time.monotonic() - start < 10  # no retry loop
    message = str(exc.value)
    assert "\n" not in message and "--gender-onnx FILE" in message and "does not resolve" in message
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelname == "WARNING"]


@pytest.mark.parametrize("value,offline", [("1", True), (" TRUE ", True), ("Yes", True), ("on", True), ("0", False), ("", False)])
def test_hub_offline_reads_the_usual_true_spellings(value, offline, monkeypatch):
    from builders.hub import hub_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
