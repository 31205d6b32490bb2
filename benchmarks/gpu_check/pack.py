"""Pack what the GPU machine lacks into device-call-sized groups (run HERE, from the
repository root, on a machine that reaches PyPI); part of the GPU verification kit.

    python3 benchmarks/gpu_check/pack.py pack            # download into .whl/, pack into .carry/
    python3 benchmarks/gpu_check/pack.py pack --offline  # pack what .whl/ already holds
    python3 benchmarks/gpu_check/pack.py unpack STASH SITE   # on the GPU machine (run.sh full)

Two tiers, in the order a 15-minute GPU lease can afford them:

* **core** (``.carry/01/core/``, about 2.5 MiB): the pycuda sdist (or a pycuda wheel
  built on an earlier GPU run and saved under ``.whl/built/``) and pycuda's pure-Python
  dependencies. Enough for the kernels, the streamed executor with the PyTorch backend,
  the overlap figures and the PyTorch reference timings (``run.sh core``).
* **full**: DALI (GPU decoding) and polars (the parquet writer) with their
  dependencies, for the DALI GPU tests, ``engine run --device gpu`` and the benchmark
  (``run.sh full``). The wheels are unzipped into one tree, trimmed of what the GPU
  machine cannot use (DALI's and nvImageCodec's modules for other Pythons, DALI's C++ headers,
  and the nvImageCodec extensions for JPEG 2000 and TIFF, which DALI loads only when
  such a file comes), and packed as one ``full.tar.xz``: xz makes it markedly smaller
  than the wheels' zip compression (figures in README.md), so fewer calls carry it. The
  archive is split into ``full.tar.xz.part-NN`` files, the first riding in group 01
  beside core, the rest one group each; ``full.sha256`` holds the archive's hash.

Every group is at most ``--group-mib`` (60 MiB: with the ~2 MiB working tree it stays
under the device tool's 64 MiB per call; ``pack`` checks the tree's size and says when
it does not). ``.whl/``, ``.carry/`` and ``.stash/`` are
git-ignored: nothing downloaded is committed. The GPU machine has Python 3.12, so every
compiled wheel is for cp312.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

GROUP_MIB = 60
CALL_LIMIT_MIB = 64  # the device tool's limit per call: working tree + carried paths
PYTHON_TAG = "312"

# pycuda and what it imports at run time (pytools needs siphash24).
CORE_WHEELS = ("pytools==2026.1.1", "platformdirs==4.14.8", "siphash24==1.9", "mako==1.4.3")
CORE_SDISTS = ("pycuda==2026.1",)
# DALI 2.4 and the dependencies its metadata names that the GPU image lacks; polars.
# There already (not carried): numpy, packaging, six, pyyaml, typing-extensions, tqdm.
FULL_WHEELS = (
    "nvidia-dali-cuda130==2.4.0",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "optree==0.20.0",
    "nvtx==0.2.17",
    "makefun==1.16.0",
    "libcst==1.9.0",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-nvjpeg==13.3.2.43",
    "polars==2.1.0",
    "polars-runtime-32==2.1.0",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

_OTHER_ABI = re.compile(r"\.cpython-(\d+t?)-x86_64-linux-gnu\.so$")


def project(name: str) -> str:
    """Normalised project name of a requirement (``a==1``) or of a wheel/sdist file name."""
    stem = name.split("==")[0] if "==" in name else name
    if stem.endswith((".whl",)):
        stem = stem.split("-")[0]
    elif stem.endswith((".tar.gz", ".zip")):
        stem = re.sub(r"-[0-9].*$", "", stem)
    return re.sub(r"[-_.]+", "_", stem).lower()


def keep_member(path: str, python_tag: str = PYTHON_TAG) -> bool:
    """Whether an unzipped wheel file goes into the full pack."""
    m = _OTHER_ABI.search(path)
    if m and path.startswith("nvidia/") and m.group(1) != python_tag:
        return False  # DALI and nvImageCodec ship a module for every CPython; the GPU machine runs one
    if path.startswith("nvidia/dali/include/"):
        return False  # C++ headers for custom operators
    if re.search(r"nvimgcodec/extensions/.*(nvjpeg2k|nvtiff|tiff)", path):
        return False  # JPEG 2000 / TIFF decoders: loaded only for those formats
    if ".dist-info/RECORD" in path:
        return False  # hashes of files we may have dropped; pip is not involved on the GPU side
    return True


def download(specs: Iterable[str], dest: Path, *, sdist: bool = False) -> None:
    for spec in specs:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
        if sdist:
            cmd += ["--no-binary=:all:", "--no-build-isolation", spec]
        else:
            cmd += ["--only-binary=:all:", "--python-version", PYTHON_TAG[0] + "." + PYTHON_TAG[1:],
                    "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], spec]
        subprocess.run(cmd, check=True)


def pick(dest: Path, specs: Sequence[str], suffixes: tuple[str, ...]) -> list[Path]:
    """The one file in ``dest`` for each requirement (two versions of one project stop
    the install on the GPU side, so that is an error here)."""
    out = []
    for spec in specs:
        name = project(spec)
        found = [f for f in dest.iterdir() if f.is_file() and f.name.endswith(suffixes) and project(f.name) == name]
        if len(found) != 1:
            raise SystemExit(f"pack: expected one file for {spec} in {dest}, found {[f.name for f in found]}")
        out.append(found[0])
    return out


def build_full_archive(wheels: Sequence[Path], archive: Path, python_tag: str = PYTHON_TAG) -> tuple[int, int]:
    """Unzip ``wheels`` into one tree, trimmed by :func:`keep_member`, as ``archive``
    (tar.xz; the ``xz`` program on all cores where it exists, else Python's lzma).
    Returns (bytes kept uncompressed, files kept)."""
    kept_bytes = kept_files = 0
    seen: set[str] = set()
    plain = archive.with_suffix("")  # NAME.tar
    with tarfile.open(plain, "w") as tar:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    if info.is_dir() or not keep_member(info.filename, python_tag) or info.filename in seen:
                        continue
                    seen.add(info.filename)
                    data = zf.read(info)
                    member = tarfile.TarInfo(info.filename)
                    member.size = len(data)
                    member.mode = ((info.external_attr >> 16) & 0o777) or 0o644
                    member.mtime = int(time.mktime(info.date_time + (0, 0, -1)))
                    tar.addfile(member, io.BytesIO(data))
                    kept_bytes += len(data)
                    kept_files += 1
    if shutil.which("xz"):
        subprocess.run(["xz", "-9", "-T0", "-f", str(plain)], check=True)  # writes NAME.tar.xz
        if plain.with_name(plain.name + ".xz") != archive:
            plain.with_name(plain.name + ".xz").rename(archive)
    else:
        import lzma

        with open(plain, "rb") as src, lzma.open(archive, "wb", preset=9) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        plain.unlink()
    return kept_bytes, kept_files


def split_file(path: Path, part_bytes: int, out_dir: Path) -> list[Path]:
    """``path`` cut into ``NAME.part-00``, ``-01``, ... of at most ``part_bytes`` in
    ``out_dir``; the parts concatenated in name order are the file."""
    parts = []
    with open(path, "rb") as f:
        for i in range(10_000):
            chunk = f.read(part_bytes)
            if not chunk:
                break
            part = out_dir / f"{path.name}.part-{i:02d}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Group:
    name: str  # .carry/NN
    files: tuple[Path, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def lay_out(carry: Path, core: Sequence[Path], parts: Sequence[Path], checksum: Path, limit: int) -> list[Group]:
    """Group 01: ``core/`` + the checksum + as many leading parts as fit; then one part a
    group. Files are moved (parts, checksum) or copied (core) into place."""
    if carry.exists():
        shutil.rmtree(carry)
    groups: list[list[Path]] = [[]]
    first = carry / "01"
    (first / "core").mkdir(parents=True)
    for f in core:
        groups[0].append(Path(shutil.copy2(f, first / "core" / f.name)))
    groups[0].append(Path(shutil.move(str(checksum), first / checksum.name)))
    used = sum(f.stat().st_size for f in groups[0])
    for part in parts:
        size = part.stat().st_size
        if size > limit:
            raise SystemExit(f"pack: part {part.name} ({size} bytes) is larger than a group ({limit})")
        if used + size > limit:
            groups.append([])
            used = 0
        d = carry / f"{len(groups):02d}"
        d.mkdir(parents=True, exist_ok=True)
        groups[-1].append(Path(shutil.move(str(part), d / part.name)))
        used += size
    return [Group(f"{carry.name}/{i + 1:02d}", tuple(g)) for i, g in enumerate(groups)]


def unpack(stash: Path, site: Path) -> int:
    """Reassemble ``stash/full.tar.xz.part-*``, check it against ``stash/full.sha256``
    and extract it into ``site``. Returns the number of parts; a missing or damaged part
    is an error that says so (nothing is extracted then)."""
    start = time.perf_counter()
    parts = sorted(stash.glob("full.tar.xz.part-*"))
    checksum = stash / "full.sha256"
    if not parts or not checksum.is_file():
        raise SystemExit(f"unpack: no full.tar.xz.part-* or full.sha256 in {stash}: carry every group first")
    numbers = [int(p.name.rsplit("-", 1)[1]) for p in parts]
    if numbers != list(range(len(parts))):
        raise SystemExit(f"unpack: parts {numbers} in {stash}: some are missing")
    h = hashlib.sha256()
    data = io.BytesIO()
    for part in parts:
        chunk = part.read_bytes()
        h.update(chunk)
        data.write(chunk)
    want = checksum.read_text().split()[0]
    if h.hexdigest() != want:
        raise SystemExit(f"unpack: sha256 of the {len(parts)} parts is {h.hexdigest()}, expected {want}: a part is damaged")
    data.seek(0)
    site.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=data, mode="r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(site, filter="data")
        else:
            tar.extractall(site)
    print(f"full pack: {len(parts)} parts, {data.tell() / 2**20:.1f} MiB, unpacked into {site} "
          f"in {time.perf_counter() - start:.1f} s")
    return len(parts)


def pack(root: Path, *, offline: bool, group_mib: int) -> list[Group]:
    whl, carry = root / ".whl", root / ".carry"
    for d in (".whl", ".carry", ".stash"):
        if subprocess.run(["git", "-C", str(root), "check-ignore", "-q", f"{d}/x"], check=False).returncode != 0:
            raise SystemExit(f"pack: {d}/ is not git-ignored; add it to .gitignore or .git/info/exclude first")
    whl.mkdir(exist_ok=True)
    if not offline:
        download(CORE_WHEELS + FULL_WHEELS, whl)
        download(CORE_SDISTS, whl, sdist=True)

    built = sorted((whl / "built").glob(f"pycuda-*-cp{PYTHON_TAG}-*.whl")) if (whl / "built").is_dir() else []
    core = pick(whl, CORE_WHEELS, (".whl",)) + (built[-1:] or pick(whl, CORE_SDISTS, (".tar.gz",)))
    full = pick(whl, FULL_WHEELS, (".whl",))

    start = time.perf_counter()
    staging = whl / "pack"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    archive = staging / "full.tar.xz"
    kept, files = build_full_archive(full, archive)
    checksum = staging / "full.sha256"
    checksum.write_text(f"{sha256(archive)}  full.tar.xz\n")
    wheels_mib = sum(w.stat().st_size for w in full) / 2**20
    print(f"full pack: {len(full)} wheels ({wheels_mib:.1f} MiB as wheels) -> {files} files, "
          f"{kept / 2**20:.1f} MiB unpacked -> {archive.stat().st_size / 2**20:.1f} MiB tar.xz "
          f"in {time.perf_counter() - start:.0f} s")
    groups = split_and_lay_out(archive, checksum, core, carry, group_mib * 2**20)
    shutil.rmtree(staging, ignore_errors=True)

    print("\ncore (group 01/core):")
    for f in core:
        print(f"  {f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    print("\ncarry groups (one device call each, in order; see benchmarks/gpu_check/README.md):")
    for g in groups:
        print(f"  {g.name}  {g.nbytes / 2**20:5.1f} MiB  {' '.join(f.name for f in g.files if f.parent.name != 'core')}")
    print(f"groups: {len(groups)}")
    tree = working_tree_bytes(root)
    largest = max(g.nbytes for g in groups)
    if tree + largest > CALL_LIMIT_MIB * 2**20:
        print(f"WARNING: working tree {tree / 2**20:.1f} MiB + largest group {largest / 2**20:.1f} MiB exceeds "
              f"the {CALL_LIMIT_MIB} MiB a device call carries: pack again with a smaller --group-mib")
    else:
        print(f"working tree {tree / 2**20:.1f} MiB + largest group {largest / 2**20:.1f} MiB: fits one call")
    return groups


def working_tree_bytes(root: Path) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked files and
    untracked files git does not ignore."""
    listing = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    total = 0
    for name in filter(None, listing.split(b"\0")):
        path = root / os.fsdecode(name)
        if path.is_file():
            total += path.stat().st_size
    return total


def split_and_lay_out(archive: Path, checksum: Path, core: Sequence[Path], carry: Path, limit: int) -> list[Group]:
    """Cut ``archive`` so that its first part fills group 01 beside ``core`` and the
    checksum, the rest in parts of ``limit``; lay the groups out under ``carry``."""
    staging = archive.parent
    first_room = limit - sum(f.stat().st_size for f in core) - checksum.stat().st_size
    if first_room < 1:
        raise SystemExit(f"pack: core ({sum(f.stat().st_size for f in core)} bytes) leaves no room in a group of {limit}")
    parts = split_file(archive, first_room, staging)
    if len(parts) > 1:  # re-cut the tail into full-size parts
        tail = staging / "tail"
        with open(tail, "wb") as out:
            for part in parts[1:]:
                out.write(part.read_bytes())
                part.unlink()
        rest = split_file(tail, limit, staging)
        tail.unlink()
        parts = parts[:1] + [part.rename(staging / f"{archive.name}.part-{i + 1:02d}") for i, part in enumerate(rest)]
    archive.unlink()
    return lay_out(carry, core, parts, checksum, limit)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="download (unless --offline) and pack into .carry/")
    pk.add_argument("--offline", action="store_true", help="do not download; pack what .whl/ holds")
    pk.add_argument("--group-mib", type=int, default=GROUP_MIB)
    pk.add_argument("--root", type=Path, default=Path.cwd())
    up = sub.add_parser("unpack", help="on the GPU machine: reassemble, check and extract the full pack")
    up.add_argument("stash", type=Path)
    up.add_argument("site", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        pack(args.root.resolve(), offline=args.offline, group_mib=args.group_mib)
    else:
        unpack(args.stash, args.site)
    return 0


if __name__ == "__main__":
    sys.exit(main())
