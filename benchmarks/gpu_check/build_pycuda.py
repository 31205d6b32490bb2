"""Build a pycuda wheel from its sdist, fast, on the GPU machine (or anywhere with a
CUDA toolkit); part of the GPU verification kit (see README.md beside this file).

    python3 benchmarks/gpu_check/build_pycuda.py SDIST.tar.gz OUT_DIR [--jobs N]

pycuda has no wheels on PyPI, and a plain ``pip install pycuda-*.tar.gz`` compiles its
45 C++ files (most of them the bundled Boost.Python subset) one after another, with
``-g``: 2 minutes on our 2-core box, time a 15-minute GPU lease cannot spare. This
script:

* unpacks the sdist and writes its ``siteconf.py`` with the CUDA toolkit found from
  ``$CUDA_HOME``, ``/usr/local/cuda`` or ``nvcc`` (``include/cuda.h`` must exist;
  pycuda's own guess takes ``nvcc``'s folder, which is wrong where ``nvcc`` is a
  wrapper script in ``/usr/local/bin``);
* finds a ``libcuda.so`` to link against: the toolkit's ``lib64/stubs`` or
  ``lib64``, else the driver's ``libcuda.so.1`` (``ldconfig -p``,
  ``/usr/local/nvidia/lib64``, ...) through a symlink named ``libcuda.so`` in a
  folder of its own (the linker's ``-lcuda`` needs the unversioned name);
* turns off CURAND (the engine does not use it; one library less to find);
* compiles the files of each extension in parallel (``--jobs``, default: the cores),
  without debug information (``CFLAGS=-g0``);
* writes ``pycuda-*.whl`` into ``OUT_DIR`` and prints the time it took.

Install the wheel with ``pip install --no-deps --target SITE OUT_DIR/pycuda-*.whl``.
Its run-time dependencies (pytools, platformdirs, mako, siphash24) are carried beside it.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DRIVER_DIRS = (
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/lib/wsl/lib",
)


def cuda_root() -> Path:
    """The CUDA toolkit: the first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and the
    folder above a real ``nvcc`` binary that has ``include/cuda.h``."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "include" / "cuda.h").is_file():
            return Path(c)
    sys.exit(f"build_pycuda: no CUDA toolkit with include/cuda.h among {[c for c in candidates if c]}")


def driver_link_dir(root: Path, scratch: Path) -> Path:
    """A folder holding ``libcuda.so`` for ``-lcuda``."""
    for d in (root / "lib64" / "stubs", root / "lib64", root / "lib" / "stubs", root / "lib",
              root / "targets" / "x86_64-linux" / "lib" / "stubs"):
        if (d / "libcuda.so").exists():
            return d
    found: list[str] = []
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
        found += [line.split("=>")[-1].strip() for line in listing.splitlines() if "libcuda.so.1 " in line]
    except OSError:
        pass
    found += [str(Path(d) / "libcuda.so.1") for d in DRIVER_DIRS]
    for lib in found:
        if Path(lib).exists():
            link_dir = scratch / "cudalink"
            link_dir.mkdir(exist_ok=True)
            (link_dir / "libcuda.so").unlink(missing_ok=True)
            (link_dir / "libcuda.so").symlink_to(lib)
            return link_dir
    sys.exit(f"build_pycuda: no libcuda.so under {root} and no libcuda.so.1 of a driver (looked in {DRIVER_DIRS})")


# Run inside the unpacked sdist by a fresh interpreter: per-file parallel compilation
# for setuptools' compiler, then setup.py bdist_wheel.
_PARALLEL_SETUP = r"""
import os, sys, runpy
from concurrent.futures import ThreadPoolExecutor
jobs = int(os.environ["BUILD_PYCUDA_JOBS"])

def parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                     extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    def one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, objects))
    return objects

import setuptools  # its distutils is the one setup.py's build uses
from distutils import ccompiler
ccompiler.CCompiler.compile = parallel_compile
sys.argv = ["setup.py", "bdist_wheel", "--dist-dir", os.environ["BUILD_PYCUDA_OUT"]]
runpy.run_path("setup.py", run_name="__main__")
"""


def build(sdist: Path, out_dir: Path, jobs: int) -> Path:
    start = time.perf_counter()
    root = cuda_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-pycuda-") as tmp:
        scratch = Path(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(scratch, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(scratch)
        (src,) = [p for p in scratch.iterdir() if p.is_dir() and (p / "setup.py").exists()]
        link = driver_link_dir(root, scratch)
        (src / "siteconf.py").write_text(
            f"CUDA_ROOT = {str(root)!r}\n"
            f"CUDA_INC_DIR = [{str(root / 'include')!r}]\n"
            f"CUDADRV_LIB_DIR = [{str(link)!r}]\n"
            f"CUDART_LIB_DIR = [{str(root / 'lib64')!r}]\n"
            "CUDA_ENABLE_CURAND = False\n"
            "USE_SHIPPED_BOOST = True\n"
        )
        env = dict(os.environ, BUILD_PYCUDA_JOBS=str(jobs), BUILD_PYCUDA_OUT=str(out_dir.resolve()),
                   CFLAGS=(os.environ.get("CFLAGS", "") + " -g0").strip())
        print(f"build_pycuda: {sdist.name} with CUDA at {root}, libcuda from {link}, {jobs} jobs", flush=True)
        proc = subprocess.run([sys.executable, "-c", _PARALLEL_SETUP], cwd=src, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            sys.exit(f"build_pycuda: setup.py bdist_wheel failed (exit {proc.returncode})")
    wheels = sorted(out_dir.glob("pycuda-*.whl"), key=os.path.getmtime)
    if not wheels:
        sys.exit(f"build_pycuda: no wheel in {out_dir}")
    print(f"build_pycuda: built {wheels[-1].name} ({wheels[-1].stat().st_size / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return wheels[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sdist", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    build(args.sdist, args.out_dir, max(1, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
