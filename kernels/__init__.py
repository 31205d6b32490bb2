"""CUDA C kernels compiled at run time (pycuda), each with a NumPy reference.

* ``preprocess.cu``: fused resize + crop + normalise + HWC->CHW (float16/float32) for
  images decoded on the host, in two conventions: OpenCV's cv2.resize (bilinear, bicubic
  a = -0.75, Lanczos4, no antialiasing; ``antialias = false`` specs) and PIL's
  Image.resize (bilinear, bicubic a = -0.5, Lanczos3, filter widened when shrinking;
  ``antialias = true`` specs).
* ``postprocess.cu``: fused softmax + argmax, one warp per row.

References: :mod:`kernels.reference`; argument packing: :mod:`kernels.launch`.
Nothing here touches CUDA at import: pycuda is imported inside :func:`compile_module`,
and :func:`nvcc_check` only runs the ``nvcc`` executable (CI compiles every source with
it, so a syntax error fails without a GPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from typing import Any, Sequence

from engine.errors import DependencyError, EngineError

log = logging.getLogger(__name__)

# Checked by nvcc_check: Ampere (A100) and Hopper (H100/H200), the GPUs we target.
# CUDA 13 supports sm_75 and newer only.
DEFAULT_ARCHS: tuple[str, ...] = ("sm_80", "sm_90")
# Warnings are errors: an unused variable or a narrowing conversion in a kernel is a bug.
NVCC_FLAGS: tuple[str, ...] = ("-std=c++17", "-Werror", "all-warnings")
NVCC_TIMEOUT_S = 120


class KernelCompileError(EngineError):
    """A kernel source did not compile (nvcc or pycuda); the message holds the compiler's output."""


def sources() -> list[str]:
    """Names of the packaged .cu sources (``preprocess``, ``postprocess``, ...)."""
    return sorted(
        entry.name[: -len(".cu")]
        for entry in resources.files(__name__).iterdir()
        if entry.is_file() and entry.name.endswith(".cu")
    )


def load_source(name: str) -> str:
    """Text of ``kernels/<name>.cu``."""
    stem = name[:-3] if name.endswith(".cu") else name
    entry = resources.files(__name__) / f"{stem}.cu"
    if not entry.is_file():
        raise KernelCompileError(f"no kernel source '{stem}.cu' (known: {', '.join(sources())})")
    return entry.read_text(encoding="utf-8")


def compile_module(name: str, options: Sequence[str] = (), **source_module_kwargs: Any):
    """Compile ``kernels/<name>.cu`` with pycuda for the current context's device and return
    the ``pycuda.compiler.SourceModule`` (``module.get_function("preprocess_u8_to_f16")``).

    A CUDA context must be current (the caller owns it; no ``pycuda.autoinit``). The
    sources declare their own ``extern "C"`` entry points, so ``no_extern_c=True``.
    """
    try:
        from pycuda.compiler import SourceModule
        from pycuda.driver import CompileError
    except ImportError:
        raise DependencyError("pycuda", "gpu", "The CUDA kernels") from None
    source = load_source(name)
    start = time.perf_counter()
    log.info("compiling kernels/%s.cu with pycuda", name)
    try:
        module = SourceModule(source, no_extern_c=True, options=["-std=c++17", *options], **source_module_kwargs)
    except CompileError as exc:
        raise KernelCompileError(f"kernels/{name}.cu did not compile: {exc}") from exc
    log.info("compiled kernels/%s.cu in %.2f s", name, time.perf_counter() - start)
    return module


def find_nvcc() -> str | None:
    """Path of nvcc ($CUDA_HOME/bin, then PATH), or None."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def nvcc_check(name: str, *, source: str | None = None, archs: Sequence[str] = DEFAULT_ARCHS) -> None:
    """Compile ``kernels/<name>.cu`` (or the given ``source`` text, named ``name``) to a cubin
    for each arch with nvcc, warnings as errors; raise :class:`KernelCompileError` with the
    compiler's output on failure. Nothing is kept: the output goes to a temporary folder."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelCompileError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    text = load_source(name) if source is None else source
    gencode = [f"-gencode=arch=compute_{a.removeprefix('sm_')},code={a}" for a in archs]
    with tempfile.TemporaryDirectory(prefix="kernels-nvcc-") as tmp:
        src_path = os.path.join(tmp, f"{name}.cu")
        with open(src_path, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = [nvcc, "-c", *NVCC_FLAGS, *gencode, "-o", os.path.join(tmp, f"{name}.o"), src_path]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise KernelCompileError(f"nvcc took over {NVCC_TIMEOUT_S} s on {name}.cu") from None
        log.debug("nvcc %s.cu (%s) took %.2f s", name, ",".join(archs), time.perf_counter() - start)
    if proc.returncode != 0:
        output = (proc.stderr + proc.stdout).replace(tmp, "<tmp>").strip()
        raise KernelCompileError(f"nvcc failed on {name}.cu (exit {proc.returncode}):\n{output}")
