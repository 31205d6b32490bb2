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


def _fresh_hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, so that no earlier download answers."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def test_offline_mode_says_why_and_puts_the_hub_log_level_back(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import logging

    _fresh_hub_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_log = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_log, "level", logging.INFO)
    spec = SpecRegistry.builtin().get("quality")
    with pytest.raises(ModelError) as exc:
        download_published(spec, tmp_path / "dest")
    message = str(exc.value)
    assert "(HF_HUB_OFFLINE is set)" in message and "--quality-onnx FILE" in message and "\n" not in message
    assert hub_log.level == logging.INFO


def test_a_repository_name_the_hub_refuses_is_one_line(tmp_path, monkeypatch):
    """huggingface_hub refuses a malformed repo id with a ValueError (HFValidationError),
    before any network: the same one-line ModelError as a failed download."""
    pytest.importorskip("huggingface_hub")
    from dataclasses import replace

    _fresh_hub_cache(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = SpecRegistry.builtin().get("gender")
    bad = replace(spec, hub=replace(spec.hub, repo="not a//valid repo id"))
    with pytest.raises(ModelError, match=r"could not download not a//valid repo id/"):
        download_published(bad, tmp_path / "dest")


@pytest.mark.parametrize("endpoint, resolves", [("file:///no/host/here", True), ("https://no-such-hub.invalid", False)])
def test_hub_resolves_checks_the_endpoints_host(endpoint, resolves, monkeypatch):
    """No host name (a local endpoint) is nothing to resolve; a name under the reserved
    .invalid domain never resolves (RFC 6761)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    assert _hub_resolves() is resolves
