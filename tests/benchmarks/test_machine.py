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
