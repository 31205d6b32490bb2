"""Every kernel source compiles with nvcc (warnings are errors), so a syntax error fails CI
without a GPU; and the check itself can fail."""

from __future__ import annotations

from pathlib import Path

import pytest

import kernels

NVCC = kernels.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit; set CUDA_HOME or PATH)")


def test_sources_are_packaged():
    assert kernels.sources() == ["postprocess", "preprocess"]
    for name in kernels.sources():
        assert 'extern "C" __global__' in kernels.load_source(name)
    assert kernels.load_source("preprocess.cu") == kernels.load_source("preprocess")


def test_unknown_source_is_named():
    with pytest.raises(kernels.KernelCompileError, match="no kernel source 'nope.cu'"):
        kernels.load_source("nope")


@needs_nvcc
@pytest.mark.parametrize("name", kernels.sources())
def test_source_compiles_with_nvcc(name):
    kernels.nvcc_check(name)


@needs_nvcc
def test_broken_source_fails_with_the_compiler_message():
    broken = kernels.load_source("postprocess").replace("const float inv = 1.0f / sum;", "const float inv = 1.0f / summ;")
    assert broken != kernels.load_source("postprocess")
    with pytest.raises(kernels.KernelCompileError, match=r'identifier "summ" is undefined'):
        kernels.nvcc_check("postprocess", source=broken, archs=("sm_80",))


@needs_nvcc
def test_warnings_fail_too():
    source = 'extern "C" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }'
    with pytest.raises(kernels.KernelCompileError, match="unused"):
        kernels.nvcc_check("warns", source=source, archs=("sm_80",))


def test_missing_nvcc_is_an_error(monkeypatch):
    monkeypatch.setattr(kernels, "find_nvcc", lambda: None)
    with pytest.raises(kernels.KernelCompileError, match="nvcc not found"):
        kernels.nvcc_check("preprocess")


def test_compile_module_without_pycuda_names_the_extra(monkeypatch):
    import builtins

    from engine.errors import DependencyError

    real_import = builtins.__import__

    def no_pycuda(name, *args, **kwargs):
        if name == "pycuda" or name.startswith("pycuda."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pycuda)
    with pytest.raises(DependencyError, match=r"pycuda.*\[gpu\]"):
        kernels.compile_module("preprocess")


def test_import_touches_no_cuda():
    import subprocess
    import sys

    code = "import sys, kernels, kernels.reference, kernels.launch; print([m for m in ('pycuda', 'tensorrt', 'nvidia.dali') if m in sys.modules])"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(kernels.KernelCompileError, match=r"\(known: postprocess, preprocess\)"):
        kernels.load_source("nope")


def _executable(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_find_nvcc_takes_the_toolkit_folder_before_path(variable, tmp_path, monkeypatch):
    toolkit = _executable(tmp_path / "toolkit" / "bin" / "nvcc")
    on_path = _executable(tmp_path / "path" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert kernels.find_nvcc() == str(on_path)
    monkeypatch.setenv(variable, str(tmp_path / "toolkit"))
    assert kernels.find_nvcc() == str(toolkit)


def test_find_nvcc_skips_a_toolkit_nvcc_that_is_not_executable(tmp_path, monkeypatch):
    _executable(tmp_path / "toolkit" / "bin" / "nvcc", mode=0o644)
    on_path = _executable(tmp_path / "path" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert kernels.find_nvcc() == str(on_path)


@needs_nvcc
def test_compiler_message_hides_the_temporary_folder():
    source = 'extern "C" __global__ void k(float* x) { x[0] = y; }'
    with pytest.raises(kernels.KernelCompileError) as caught:
        kernels.nvcc_check("hidden", source=source, archs=("sm_80",))
    message = str(caught.value)
    assert "<tmp>/hidden.cu" in message and "kernels-nvcc-" not in message
