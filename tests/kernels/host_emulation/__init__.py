"""Build and drive a host (CPU) emulation of a kernel source: the unmodified .cu file is
compiled by g++ as C++ with ``shim.h`` force-included and ``harness.cpp`` around it, into
a shared library that runs a :class:`kernels.launch.Launch` over its whole grid.

Pointers in a launch's arguments are host addresses here (``array.ctypes.data``), and the
arguments are handed over as kernels.launch packed them for pycuda (each by its NumPy
type), so the packing is exercised too: the harness refuses an argument whose type or
size does not match the kernel's own parameter.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

import numpy as np

import kernels
from kernels.launch import Launch

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim.h"
HARNESS = HERE / "harness.cpp"
COMPILE_TIMEOUT_S = 120
# No FP contraction, so the host result is plain IEEE float arithmetic, one rounding per
# operation. The optimisation level is build()'s: compiling dominates a test run.
CXX_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas")

_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


class EmulationError(RuntimeError):
    """The harness refused or flagged a launch (argument mismatch, diverged shuffle, ...)."""


def host_compiler() -> str | None:
    return shutil.which("g++")


@functools.lru_cache(maxsize=1)
def toolkit_include_dirs() -> list[str] | None:
    """The CUDA toolkit's include folders (for cuda_fp16.h and what it includes), or None.

    $CUDA_HOME / $CUDA_PATH first, as kernels.find_nvcc does; otherwise ask nvcc itself
    (``--dryrun`` prints its include flags), which also works when the nvcc on PATH is a
    wrapper script outside the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return [str(Path(home) / "include")]
    nvcc = kernels.find_nvcc()
    if nvcc is None:
        return None
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=30, check=False)
        printed = proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired):
        printed = ""
    dirs = [d for d in dryrun_include_dirs(printed) if os.path.isdir(d)]
    if any((Path(d) / "cuda_fp16.h").is_file() for d in dirs):
        return dirs
    # nvcc's own line did not name it: where toolkits and distribution packages put it
    # (/usr/include is on g++'s own path: no flag, and -isystem on it would break
    # libstdc++'s #include_next)
    for d in (Path(nvcc).resolve().parent.parent / "include", Path("/usr/local/cuda/include")):
        if (d / "cuda_fp16.h").is_file():
            return [str(d)]
    return [] if Path("/usr/include/cuda_fp16.h").is_file() else None


def dryrun_include_dirs(printed: str) -> list[str]:
    """The include folders named on the INCLUDES / SYSTEM_INCLUDES lines of ``nvcc
    --dryrun``'s output, in order, each once: quoted ("-I/x" or "/x") or bare (-I/x), as
    nvcc versions print them."""
    dirs = []
    for line in printed.splitlines():
        if line.startswith("#$ INCLUDES=") or line.startswith("#$ SYSTEM_INCLUDES="):
            value = line.split("=", 1)[1]
            dirs += [d for d in re.findall(r'"([^"]+)"', value) if not d.startswith("-")]
            dirs += re.findall(r'"-I([^"]+)"', value)
            dirs += re.findall(r'(?:^|\s)-I([^\s"]+)', value)
    return list(dict.fromkeys(dirs))


def absent_reason() -> str | None:
    """Why the emulation cannot be built here, or None."""
    if host_compiler() is None:
        return "g++ not found: cannot compile the kernel sources for the host"
    if toolkit_include_dirs() is None:
        where = "nvcc's include folders" if kernels.find_nvcc() else "no nvcc on PATH"
        return f"CUDA toolkit headers (cuda_fp16.h) not found ({where}): set CUDA_HOME to the toolkit"
    return None


def entry_points(source_text: str) -> list[str]:
    """The extern "C" __global__ functions a source declares, in order."""
    return _ENTRY.findall(source_text)


def compile_command(source: Path, output: Path, opt: str = "-O0") -> list[str]:
    entries = "".join(f"EMU_ENTRY({name})" for name in entry_points(source.read_text(encoding="utf-8")))
    if not entries:
        raise ValueError(f"{source} declares no extern \"C\" __global__ entry point")
    if '"' in str(source) or "\\" in str(source):
        raise ValueError(f"{source}: the path goes into a C string literal")
    include = [flag for d in toolkit_include_dirs() or [] for flag in ("-isystem", d)]
    return [host_compiler(), *CXX_FLAGS, opt, *include, "-include", str(SHIM), f'-DEMU_KERNEL_SOURCE="{source}"',
            f"-DEMU_ENTRY_POINTS={entries}", str(HARNESS), "-o", str(output)]


def build(sources: Iterable[Path], out_dir: Path, opt: str = "-O0") -> dict[str, Path]:
    """Compile each source (in parallel) to ``out_dir/lib<stem>.so``; stem -> library path.
    ``opt``: -O0 by default, because compiling is most of a test run's time (-O1 takes
    ~1.7x as long to build the preprocess source and saves less than it costs on small
    images). The float results do not depend on it (SSE arithmetic, no contraction).
    Raises RuntimeError with the compiler's output if one fails."""
    jobs = {}
    for source in sources:
        source = Path(source).resolve()
        lib = Path(out_dir) / f"lib{source.stem}.so"
        jobs[source.stem] = (lib, subprocess.Popen(compile_command(source, lib, opt), stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True))
    failures = []
    for stem, (lib, proc) in jobs.items():
        try:
            out, _ = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failures.append(f"{stem}: g++ took over {COMPILE_TIMEOUT_S} s")
            continue
        if proc.returncode != 0:
            failures.append(f"{stem}: g++ exit {proc.returncode}\n{out}")
    if failures:
        raise RuntimeError("host build of the kernel emulation failed:\n" + "\n".join(failures))
    return {stem: lib for stem, (lib, _) in jobs.items()}


class Emulated:
    """One built kernel source: run a :class:`Launch` of it on the CPU."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_entry_name.restype = ctypes.c_char_p
        self.lib.emu_launch.restype = ctypes.c_int
        self.entry_points = [self.lib.emu_entry_name(i).decode() for i in range(self.lib.emu_entry_count())]

    def run(self, launch: Launch) -> None:
        """Run every thread of ``launch`` (synchronously). Pointer arguments must be host
        addresses of buffers that stay alive for the call."""
        # pycuda packs each argument by its NumPy type; do the same, and tell the harness
        # the type so it can check it against the kernel's parameter.
        values = [np.array(a) for a in launch.args]
        ptrs = (ctypes.c_void_p * max(len(values), 1))(*(v.ctypes.data for v in values))
        kinds = ctypes.create_string_buffer("".join(v.dtype.kind for v in values).encode(), len(values) + 1)
        sizes = (ctypes.c_int * max(len(values), 1))(*(v.dtype.itemsize for v in values))
        grid = (ctypes.c_uint * 3)(*launch.grid)
        block = (ctypes.c_uint * 3)(*launch.block)
        err = ctypes.create_string_buffer(1024)
        rc = self.lib.emu_launch(launch.function.encode(), grid, block, len(values), ptrs, kinds, sizes, err,
                                 len(err))
        if rc != 0:
            raise EmulationError(f"{launch.function}: {err.value.decode()}")

    # The shim's own pieces, for checking them against NumPy.

    def float2half_rn(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty(x.shape, np.uint16)
        self.lib.emu_float2half_rn(ctypes.c_int(x.size), ctypes.c_void_p(x.ctypes.data),
                                   ctypes.c_void_p(out.ctypes.data))
        return out.view(np.float16)

    def half2float(self, h: np.ndarray) -> np.ndarray:
        h = np.ascontiguousarray(h, np.float16).view(np.uint16)
        out = np.empty(h.shape, np.float32)
        self.lib.emu_half2float(ctypes.c_int(h.size), ctypes.c_void_p(h.ctypes.data),
                                ctypes.c_void_p(out.ctypes.data))
        return out

    def sinpif(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty(x.shape, np.float32)
        self.lib.emu_sinpif(ctypes.c_int(x.size), ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data))
        return out
