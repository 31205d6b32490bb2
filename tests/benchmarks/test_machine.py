"""Which GPU the results name: CUDA device 0, matched to nvidia-smi's list by PCI bus id."""

import pytest

from benchmarks.machine import cuda_device_present, cuda_pci_bus_id, gpu_info, parse_gpu_query, same_pci_bus
from benchmarks.schema import SchemaError, validate_results
from tests.benchmarks.docs import make_doc

# nvidia-smi --query-gpu=pci.bus_id,name,driver_version,memory.total,compute_cap
# --format=csv,noheader,nounits on a machine with two different GPUs
TWO_GPUS = """00000000:1B:00.0, NVIDIA A100-SXM4-40GB, 580.65, 40960, 8.0
00000000:3B:00.0, NVIDIA H200, 580.65, 143771, 9.0
"""


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("00000000:3B:00.0", "0000:3b:00.0", True),  # nvidia-smi vs CUDA spelling
        ("3b:00.0", "0000:3B:00.0", True),  # domain left out
        ("0000:3b:00.0", "0000:1b:00.0", False),
        ("0000:3b:00.0", "0000:3b:00.1", False),  # another function
        ("0001:3b:00.0", "0000:3b:00.0", False),  # another domain
        ("garbage", "garbage", False),
        ("", "", False),
    ],
)
def test_same_pci_bus(a, b, same):
    assert same_pci_bus(a, b) is same


def test_the_gpu_on_cuda_device_0s_bus_is_recorded_not_the_first_listed():
    # CUDA_VISIBLE_DEVICES=1: CUDA device 0 is the second GPU nvidia-smi lists
    info = parse_gpu_query(TWO_GPUS, "0000:3b:00.0")
    assert info == {
        "name": "NVIDIA H200",
        "driver": "580.65",
        "count": 2,
        "pci_bus_id": "00000000:3B:00.0",
        "selected_by": "cuda_device_0",
        "memory_mb": 143771.0,
        "compute_capability": "9.0",
    }


def test_without_a_bus_id_or_a_match_the_first_gpu_is_recorded_and_says_so():
    for bus in (None, "0000:af:00.0"):
        info = parse_gpu_query(TWO_GPUS, bus)
        assert info["name"] == "NVIDIA A100-SXM4-40GB" and info["selected_by"] == "first_listed"
        assert info["count"] == 2
    assert parse_gpu_query("\n \n", None) is None


def test_short_or_odd_answers_do_not_raise():
    info = parse_gpu_query("00000000:3B:00.0, NVIDIA H200, 580.65, [N/A]\n", None)
    assert info["name"] == "NVIDIA H200" and info["memory_mb"] is None and info["compute_capability"] is None


def test_parsed_gpu_follows_the_schema_and_older_files_still_validate():
    doc = make_doc(gpu="NVIDIA H200")
    validate_results(doc)  # no pci_bus_id / selected_by: files written before them
    info = parse_gpu_query(TWO_GPUS, "0000:3b:00.0")
    doc["machine"]["gpu"] = {**info, "cuda_runtime": "13.0"}
    validate_results(doc)
    doc["machine"]["gpu"]["selected_by"] = "guess"
    with pytest.raises(SchemaError, match="selected_by"):
        validate_results(doc)


def test_no_bus_id_without_a_driver():
    if not cuda_device_present():
        assert cuda_pci_bus_id(0) is None


@pytest.mark.gpu
def test_bus_id_and_gpu_info_name_cuda_device_0():
    bus = cuda_pci_bus_id(0)
    assert bus is not None and same_pci_bus(bus, bus)
    info = gpu_info()
    if info is not None:  # nvidia-smi on PATH
        assert info["selected_by"] == "cuda_device_0" and same_pci_bus(info["pci_bus_id"], bus)
    from benchmarks.measure import device_used_bytes

    assert device_used_bytes() > 0  # NVML found the same GPU by its bus id


# --------------------------------------------------------------------------- machine facts


def test_package_versions_name_every_package_and_none_for_one_not_installed(monkeypatch):
    import importlib.metadata

    from benchmarks import machine

    assert set(machine.PACKAGES) >= {"anime-batch-engine", "numpy", "onnxruntime", "torch", "tensorrt"}
    monkeypatch.setattr(machine, "PACKAGES", ("numpy", "no-such-package-anywhere"))
    assert machine.package_versions() == {"numpy": importlib.metadata.version("numpy"), "no-such-package-anywhere": None}


def _proc(monkeypatch, tmp_path, files):
    """Point the module's /proc reads at ``tmp_path`` holding ``files`` (name -> text)."""
    from pathlib import Path

    from benchmarks import machine

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(machine, "Path", lambda p: tmp_path / Path(p).name)


def test_cpu_model_and_memory_come_from_proc(monkeypatch, tmp_path):
    from benchmarks.machine import cpu_model, memory_total_mb

    _proc(monkeypatch, tmp_path, {
        "cpuinfo": "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n",
        "meminfo": "MemFree:         1024 kB\nMemTotal:       16384000 kB\n",
    })
    assert cpu_model() == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert memory_total_mb() == 16000.0


def test_without_proc_files_the_cpu_falls_back_and_memory_is_none(monkeypatch, tmp_path):
    import platform

    from benchmarks.machine import cpu_model, memory_total_mb

    _proc(monkeypatch, tmp_path / "absent", {})
    assert cpu_model() == (platform.processor() or platform.machine())
    assert memory_total_mb() is None
    _proc(monkeypatch, tmp_path, {"meminfo": "MemTotal: lots kB\n"})
    assert memory_total_mb() is None


def test_usable_cpus_follow_the_affinity_mask_and_machine_info_records_them(monkeypatch):
    import os

    from benchmarks import machine

    monkeypatch.setattr(machine, "gpu_info", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.123, 1.456, 12.0))
    info = machine.machine_info()
    assert (info["cpu_count"], info["usable_cpus"], info["load_average"]) == (8, 2, [0.12, 1.46, 12.0])
    doc = make_doc()
    doc["machine"] = info
    validate_results(doc)
    monkeypatch.delattr(os, "sched_getaffinity")
    assert machine.usable_cpus() == 8  # no affinity call on this platform: every CPU

    def no_load():
        raise OSError("unavailable")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert machine.load_average() is None


def test_a_matched_gpu_is_not_warned_about_and_an_unmatched_one_is(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="benchmarks.machine"):
        parse_gpu_query(TWO_GPUS, "0000:3b:00.0")
        assert not caplog.records
        parse_gpu_query(TWO_GPUS, "0000:af:00.0")
        assert len(caplog.records) == 1 and "0000:af:00.0" in caplog.records[0].getMessage()


def test_an_answer_without_memory_keeps_the_driver_and_an_empty_bus_id_is_null():
    info = parse_gpu_query("00000000:3B:00.0, NVIDIA H200, 580.65\n", None)
    assert (info["name"], info["driver"], info["memory_mb"], info["compute_capability"]) == ("NVIDIA H200", "580.65", None, None)
    info = parse_gpu_query(", NVIDIA H200, 580.65, 143771, 9.0\n", None)
    assert info["pci_bus_id"] is None and info["name"] == "NVIDIA H200"


def _fake_nvidia_smi(monkeypatch, tmp_path, stdout, rc):
    """An ``nvidia-smi`` on PATH that prints ``stdout`` and exits ``rc`` (only its text
    answer is stood in for: no GPU or driver is involved)."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({stdout!r})\nsys.exit({rc})\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_gpu_info_reads_nvidia_smi_and_adds_the_cuda_runtime(monkeypatch, tmp_path):
    from benchmarks import machine

    monkeypatch.setattr(machine, "cuda_pci_bus_id", lambda ordinal=0: "0000:3b:00.0")
    _fake_nvidia_smi(monkeypatch, tmp_path, TWO_GPUS, 0)
    info = gpu_info()
    assert info["name"] == "NVIDIA H200" and info["selected_by"] == "cuda_device_0"
    assert "cuda_runtime" in info and info["cuda_runtime"] == machine._torch_cuda_version()
    doc = make_doc()
    doc["machine"]["gpu"] = info
    validate_results(doc)


def test_gpu_info_is_none_without_nvidia_smi_or_when_it_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpu_info() is None
    # nvidia-smi with no driver to talk to says so on stdout and exits 9: no GPU, not one named after the message
    _fake_nvidia_smi(monkeypatch, tmp_path, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n", 9)
    assert gpu_info() is None


def test_git_commit_is_the_head_of_the_repository_asked_about(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from benchmarks.machine import git_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert git_commit(repo) is None  # no commit yet: git prints "HEAD" and fails
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(repo) == head
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_commit(plain) is None
