"""The GPU verification kit's host-side logic (benchmarks/gpu_check/pack.py and
build_pycuda.py): what is packed, how it is cut into device-call groups, and that the
GPU side's unpack gives back exactly what was packed or refuses. Runs on the CPU with
small wheels made here."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pack = _load("pack")
build_pycuda = _load("build_pycuda")


def make_wheel(path: Path, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 2, 3, 4, 5))
            info.external_attr = ((0o755 if name in executable else 0o644) | stat.S_IFREG) << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "member, kept",
    [
        ("nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so", True),
        ("nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so", False),
        ("nvidia/dali/backend_impl.cpython-314t-x86_64-linux-gnu.so", False),
        ("nvidia/nvimgcodec/nvimgcodec_impl.cpython-313-x86_64-linux-gnu.so", False),
        ("nvidia/dali/libdali_operators.so", True),
        ("nvidia/dali/include/dali/core/common.h", False),
        ("nvidia/nvimgcodec/extensions/libnvjpeg2k_ext.so.0.9.0", False),
        ("nvidia/nvimgcodec/extensions/libnvtiff_ext.so.0.9.0", False),
        ("nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0", True),
        ("nvidia/nvimgcodec/extensions/libopencv_ext.so.0.9.0", True),  # PNG/WebP/BMP on the host
        ("polars/_cpu_check.py", True),
        ("siphash24.cpython-311-x86_64-linux-gnu.so", True),  # outside nvidia/: not ours to trim
        ("polars-2.1.0.dist-info/RECORD", False),
        ("polars-2.1.0.dist-info/METADATA", True),
    ],
)
def test_keep_member(member, kept):
    assert pack.keep_member(member) is kept


@pytest.mark.parametrize(
    "name, project",
    [
        ("nvidia-dali-cuda130==2.4.0", "nvidia_dali_cuda130"),
        ("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", "nvidia_dali_cuda130"),
        ("polars_runtime_32-2.1.0-cp311-abi3-manylinux_2_17_x86_64.whl", "polars_runtime_32"),
        ("pycuda-2026.1.tar.gz", "pycuda"),
        ("Mako==1.4.3", "mako"),
    ],
)
def test_project_names(name, project):
    assert pack.project(name) == project


def test_pick_refuses_two_versions_of_one_project(tmp_path):
    for v in ("1.0", "1.1"):
        make_wheel(tmp_path / f"gast-{v}-py3-none-any.whl", {"gast/__init__.py": b""})
    with pytest.raises(SystemExit, match="expected one file for gast"):
        pack.pick(tmp_path, ["gast==1.1"], (".whl",))


def _fixture_wheels(tmp_path: Path) -> tuple[list[Path], list[Path], dict[str, bytes]]:
    rng = __import__("random").Random(7)
    big = bytes(rng.getrandbits(8) for _ in range(300_000))  # incompressible: forces several parts
    dali = make_wheel(
        tmp_path / "nvidia_dali_cuda130-2.4.0-py3-none-any.whl",
        {
            "nvidia/dali/__init__.py": b"VERSION = '2.4.0'\n",
            "nvidia/dali/libdali_operators.so": big,
            "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so": b"312",
            "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so": b"311",
            "nvidia/dali/include/x.h": b"#pragma once\n",
            "nvidia_dali_cuda130-2.4.0.dist-info/RECORD": b"...",
            "nvidia_dali_cuda130-2.4.0.data/scripts/rec2idx.py": b"#!/usr/bin/env python\n",
        },
        executable=("nvidia_dali_cuda130-2.4.0.data/scripts/rec2idx.py",),
    )
    polars = make_wheel(tmp_path / "polars-2.1.0-py3-none-any.whl", {"polars/__init__.py": b"__version__ = '2.1.0'\n"})
    core = [
        make_wheel(tmp_path / "mako-1.4.3-py3-none-any.whl", {"mako/__init__.py": b""}),
        tmp_path / "pycuda-2026.1.tar.gz",
    ]
    core[1].write_bytes(b"sdist" * 1000)
    expected = {
        "nvidia/dali/__init__.py": b"VERSION = '2.4.0'\n",
        "nvidia/dali/libdali_operators.so": big,
        "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so": b"312",
        "nvidia_dali_cuda130-2.4.0.data/scripts/rec2idx.py": b"#!/usr/bin/env python\n",
        "polars/__init__.py": b"__version__ = '2.1.0'\n",
    }
    return [dali, polars], core, expected


def stash_groups(groups, stash: Path) -> Path:
    """What the GPU side does with the carried groups (run.sh stash): every file but
    core's lands in one stash folder."""
    stash.mkdir()
    for g in groups:
        for f in g.files:
            if f.parent.name != "core":
                f.rename(stash / f.name)
    return stash


def test_pack_groups_then_unpack_gives_back_the_trimmed_tree(tmp_path):
    full, core, expected = _fixture_wheels(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    archive = staging / "full.tar.xz"
    kept, files = pack.build_full_archive(full, archive)
    assert files == len(expected) and kept == sum(len(v) for v in expected.values())
    digest = pack.sha256(archive)
    checksum = staging / "full.sha256"
    checksum.write_text(f"{digest}  full.tar.xz\n")
    limit = 120_000
    groups = pack.split_and_lay_out(archive, checksum, core, tmp_path / ".carry", limit)

    assert len(groups) >= 3  # 300 kB of random bytes cannot fit two 120 kB groups
    assert all(g.nbytes <= limit for g in groups)
    first = {f.name for f in groups[0].files}
    assert {"mako-1.4.3-py3-none-any.whl", "pycuda-2026.1.tar.gz", "full.sha256", "full.tar.xz.part-00"} == first
    assert all(len(g.files) == 1 for g in groups[1:])  # one part per later call

    stash = stash_groups(groups, tmp_path / ".stash")
    parts = sorted(stash.glob("full.tar.xz.part-*"))
    assert hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest() == digest
    site = tmp_path / "site"
    assert pack.unpack(stash, site) == len(groups)
    got = {str(p.relative_to(site)): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert got == expected
    script = site / "nvidia_dali_cuda130-2.4.0.data/scripts/rec2idx.py"
    assert os.stat(script).st_mode & 0o111  # modes survive the trip


def test_unpack_refuses_a_missing_or_damaged_part(tmp_path):
    full, core, _ = _fixture_wheels(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    archive = staging / "full.tar.xz"
    pack.build_full_archive(full, archive)
    checksum = staging / "full.sha256"
    checksum.write_text(f"{pack.sha256(archive)}  full.tar.xz\n")
    groups = pack.split_and_lay_out(archive, checksum, core, tmp_path / ".carry", 120_000)
    stash = stash_groups(groups, tmp_path / ".stash")
    site = tmp_path / "site"

    last = sorted(stash.glob("full.tar.xz.part-*"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SystemExit, match="damaged"):
        pack.unpack(stash, site)
    middle = sorted(stash.glob("full.tar.xz.part-*"))[1]
    middle.unlink()
    with pytest.raises(SystemExit, match="missing"):
        pack.unpack(stash, site)
    assert not site.exists()  # nothing extracted from a bad pack


def test_core_that_fills_a_group_is_refused(tmp_path):
    full, core, _ = _fixture_wheels(tmp_path)
    archive = tmp_path / "full.tar.xz"
    pack.build_full_archive(full, archive)
    checksum = tmp_path / "full.sha256"
    checksum.write_text("x  full.tar.xz\n")
    with pytest.raises(SystemExit, match="no room"):
        pack.split_and_lay_out(archive, checksum, core, tmp_path / ".carry", 1000)


def test_split_file_parts_concatenate_to_the_file(tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 41)  # 10496 bytes
    out = tmp_path / "out"
    out.mkdir()
    parts = pack.split_file(src, 1000, out)
    assert [p.name for p in parts] == [f"blob.part-{i:02d}" for i in range(11)]
    assert all(p.stat().st_size == 1000 for p in parts[:-1]) and parts[-1].stat().st_size == 496
    assert b"".join(p.read_bytes() for p in parts) == src.read_bytes()


# -- build_pycuda -----------------------------------------------------------------


def fake_toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda.h").write_text("/* cuda.h */\n")
    (root / "lib64").mkdir()
    return root


def test_cuda_root_prefers_cuda_home_with_cuda_h(tmp_path, monkeypatch):
    good = fake_toolkit(tmp_path / "cuda-x")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))  # no include/cuda.h: passed over
    monkeypatch.setenv("CUDA_PATH", str(good))
    assert build_pycuda.cuda_root() == good


def test_driver_link_dir_uses_the_toolkit_stub(tmp_path):
    root = fake_toolkit(tmp_path / "cuda")
    (root / "lib64" / "stubs").mkdir()
    (root / "lib64" / "stubs" / "libcuda.so").write_bytes(b"stub")
    assert build_pycuda.driver_link_dir(root, tmp_path) == root / "lib64" / "stubs"


def test_driver_link_dir_links_the_drivers_versioned_library(tmp_path, monkeypatch):
    root = fake_toolkit(tmp_path / "cuda")
    driver = tmp_path / "nvidia" / "lib64"
    driver.mkdir(parents=True)
    (driver / "libcuda.so.1").write_bytes(b"driver")
    monkeypatch.setattr(build_pycuda, "DRIVER_DIRS", (str(tmp_path / "nowhere"), str(driver)))
    monkeypatch.setattr(build_pycuda.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no ldconfig")))
    link_dir = build_pycuda.driver_link_dir(root, tmp_path)
    assert (link_dir / "libcuda.so").resolve() == (driver / "libcuda.so.1").resolve()


def test_driver_link_dir_says_where_it_looked(tmp_path, monkeypatch):
    root = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(build_pycuda, "DRIVER_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.setattr(build_pycuda.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no ldconfig")))
    with pytest.raises(SystemExit, match="no libcuda.so"):
        build_pycuda.driver_link_dir(root, tmp_path)


def test_run_sh_summary_picks_the_engine_run_summary_lines(tmp_path):
    """run.sh's closing table greps `engine run`'s summary out of the log: the pattern
    must match the lines RunSummary prints (it once expected "speed " for "speed:")."""
    import re
    import subprocess

    from engine.executor import LaneStats
    from engine.runner import RunSummary
    from engine.streamed_run import stats_lines

    script = (KIT / "run.sh").read_text()
    (pattern,) = re.findall(r"grep -E '(\^\(speed[^']*)' \"\$LOG\"", script)
    summary = RunSummary(out=tmp_path / "r.parquet", images=3, errors=0, skipped=0, elapsed_s=1.5,
                         backend="tensorrt", precision="fp16", path="GPU path (forced)",
                         details=stats_lines({"gender/alpha": LaneStats(batches=1, images=3)}))
    log = tmp_path / "log"
    log.write_text("\n".join(["noise", *summary.lines()]) + "\n")
    picked = subprocess.run(["grep", "-E", pattern, str(log)], capture_output=True, text=True).stdout.splitlines()
    assert [line.split(":")[0].split(" ")[0] for line in picked] == ["speed", "path", "executor"], picked
