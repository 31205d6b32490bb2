"""The benchmark's image set: generated (reproducible from a seed) or a user's folder.

The generated set imitates the real workload rather than being noise: 16:9 frames
(1920x1080 by default) and small head crops, half PNG and half JPEG, drawn as flat
cel-shaded regions over gradient skies, with outlined shapes, a character head with hair
and eyes, and mild sensor-like noise. Compression ratio and decode cost therefore sit
near those of real anime frames, which matters more to a throughput figure than the
content itself.

Every image has its own random generator seeded from ``(seed, kind, index)``, so adding
images never changes the earlier ones; a manifest in the folder records the spec and the
files' SHA-256, and a folder whose manifest matches is reused instead of redrawn.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.fileio import leftover_temps, write_bytes_atomic

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
JPEG_QUALITY = 90
CROP_SIDES = (96, 320)  # head crops: short side drawn from this range


class ImageKind(str, Enum):
    FRAME = "frame"
    CROP = "crop"


MAX_GENERATED = 100_000  # generated frames (and crops) at most: beyond that, a folder of one's own


@dataclass(frozen=True)
class ImageSetSpec:
    frames: int
    crops: int
    frame_size: tuple[int, int]  # (width, height)
    seed: int

    def __post_init__(self) -> None:
        if self.frames < 0 or self.crops < 0:
            raise InputError("frame and crop counts cannot be negative")
        if self.frames + self.crops < 1:
            raise InputError("the generated image set needs at least one frame or crop")
        if max(self.frames, self.crops) > MAX_GENERATED:
            raise InputError(f"at most {MAX_GENERATED} generated frames and {MAX_GENERATED} crops; "
                             f"for more, point --images at a folder")
        w, h = self.frame_size
        if not (32 <= w <= 8192 and 32 <= h <= 8192):
            raise InputError(f"frame size must be between 32 and 8192 pixels a side, got {w}x{h}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")

    def to_json(self) -> dict:
        return {**asdict(self), "frame_size": list(self.frame_size), "generator_version": GENERATOR_VERSION}


@dataclass(frozen=True)
class ImageSet:
    """What the benchmark runs over (paths in a fixed order) and how it was made."""

    root: Path
    paths: tuple[Path, ...]
    source: str  # "generated" or "folder"
    spec: ImageSetSpec | None
    total_bytes: int
    counts: dict[str, int]  # by kind and format, e.g. {"frame.png": 16, ...}
    excluded: dict[str, str] = field(default_factory=dict)  # files left out (relative path: why)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "root": str(Path(self.root).absolute()),
            "count": len(self.paths),
            "total_bytes": self.total_bytes,
            "counts": dict(self.counts),
            "generator": self.spec.to_json() if self.spec else None,
            "excluded": dict(self.excluded),
            "listing_sha256": self.listing_sha256(),
        }

    def listing_sha256(self) -> str:
        """Which files, by path under the root and size: tells two folders of the same
        counts apart without reading them."""
        root = Path(self.root)
        lines = sorted(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}" for p in self.paths)
        return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


# ----------------------------------------------------------------------------- drawing


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A two-colour sky-like gradient along a random direction, float32 HxWx3 in 0..255."""
    top = rng.uniform(40, 255, 3)
    bottom = rng.uniform(40, 255, 3)
    angle = rng.uniform(0, np.pi)
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    t = np.clip(np.sin(angle) * yy + np.cos(angle) * xx * 0.5, 0.0, 1.0)
    return (top[None, None, :] * (1 - t[..., None]) + bottom[None, None, :] * t[..., None]).astype(np.float32)


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _draw_scene(draw, rng: np.random.Generator, w: int, h: int, count: int) -> None:
    """Flat-coloured background shapes (buildings, hills, props) with dark outlines."""
    outline = max(1, round(min(w, h) / 300))
    for _ in range(count):
        kind = rng.integers(0, 3)
        x0, y0 = float(rng.uniform(-0.1, 1.0) * w), float(rng.uniform(0.2, 1.0) * h)
        x1, y1 = x0 + float(rng.uniform(0.05, 0.4) * w), y0 + float(rng.uniform(0.05, 0.6) * h)
        fill = _colour(rng, 30, 230)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=fill, outline=(20, 20, 30), width=outline)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=fill, outline=(20, 20, 30), width=outline)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=fill, outline=(20, 20, 30))


def _draw_head(draw, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    """A cel-shaded character head: hair mass, face, eyes with highlights, mouth."""
    line = max(1, round(r / 40))
    ink = (25, 20, 30)
    hair = _colour(rng, 20, 240)
    skin = (int(rng.integers(225, 256)), int(rng.integers(190, 225)), int(rng.integers(170, 205)))
    shade = tuple(max(0, c - 35) for c in skin)
    # Hair behind the face, then the face, its shadow side, then the fringe.
    draw.ellipse([cx - 1.25 * r, cy - 1.3 * r, cx + 1.25 * r, cy + 1.1 * r], fill=hair, outline=ink, width=line)
    draw.ellipse([cx - 0.85 * r, cy - 0.8 * r, cx + 0.85 * r, cy + 1.0 * r], fill=skin, outline=ink, width=line)
    draw.chord([cx - 0.85 * r, cy - 0.8 * r, cx + 0.85 * r, cy + 1.0 * r], 300, 60, fill=shade)
    fringe = [(cx - 0.95 * r, cy - 0.2 * r)]
    for k in range(7):
        fx = cx - 0.95 * r + (k + 0.5) * (1.9 * r / 7)
        fringe += [(fx, cy - 0.9 * r), (fx + 0.13 * r, cy - float(rng.uniform(0.1, 0.45)) * r)]
    fringe.append((cx + 0.95 * r, cy - 0.2 * r))
    draw.polygon(fringe, fill=hair, outline=ink)
    iris = _colour(rng, 20, 220)
    for side in (-1, 1):
        ex = cx + side * 0.38 * r
        ey = cy + 0.15 * r
        draw.ellipse([ex - 0.2 * r, ey - 0.26 * r, ex + 0.2 * r, ey + 0.26 * r], fill=(250, 250, 250), outline=ink, width=line)
        draw.ellipse([ex - 0.15 * r, ey - 0.2 * r, ex + 0.15 * r, ey + 0.24 * r], fill=iris)
        draw.ellipse([ex - 0.06 * r, ey - 0.15 * r, ex + 0.03 * r, ey - 0.04 * r], fill=(255, 255, 255))
    draw.arc([cx - 0.15 * r, cy + 0.5 * r, cx + 0.15 * r, cy + 0.7 * r], 20, 160, fill=ink, width=line)


def draw_image(rng: np.random.Generator, width: int, height: int, kind: ImageKind) -> np.ndarray:
    """One synthetic anime-style RGB image, uint8 HxWx3."""
    from PIL import Image, ImageDraw, ImageFilter

    base = _gradient(rng, height, width)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    if kind is ImageKind.FRAME:
        _draw_scene(draw, rng, width, height, int(rng.integers(4, 12)))
        for _ in range(int(rng.integers(1, 3))):
            r = float(rng.uniform(0.08, 0.22) * height)
            _draw_head(draw, rng, float(rng.uniform(0.15, 0.85) * width), float(rng.uniform(0.3, 0.7) * height), r)
    else:
        _draw_scene(draw, rng, width, height, int(rng.integers(0, 3)))
        r = float(rng.uniform(0.3, 0.45) * min(width, height))  # tight or loose framing
        _draw_head(draw, rng, width / 2 + float(rng.normal(0, 0.05 * width)), height / 2 + 0.1 * r, r)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.0))))  # soft line art
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0.0, float(rng.uniform(1.0, 4.0)), arr.shape).astype(np.float32)  # grain
    return np.clip(arr, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "png":
        img.save(buf, format="PNG")  # Pillow's default zlib level, like most frame dumpers
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ----------------------------------------------------------------------------- sets


def _planned(spec: ImageSetSpec) -> list[tuple[str, ImageKind, int, str]]:
    """(file name, kind, index, format) of every image the spec asks for."""
    out = []
    for kind, count in ((ImageKind.FRAME, spec.frames), (ImageKind.CROP, spec.crops)):
        for i in range(count):
            fmt = "png" if i % 2 == 0 else "jpg"
            out.append((f"{kind.value}_{i:05d}.{fmt}", kind, i, fmt))
    return out


def _crop_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(CROP_SIDES[0], CROP_SIDES[1] + 1))
    aspect = float(rng.uniform(0.8, 1.25))
    return (short, max(8, round(short * aspect))) if aspect >= 1 else (max(8, round(short / aspect)), short)


def _check_ours(root: Path, manifest: dict | None) -> None:
    """``root`` may be written (its stale images removed) only if it holds nothing but a
    set this module generated: its manifest and the files that manifest lists. Anything
    else is a user's, and is never overwritten or deleted (and a subfolder would also be
    read by the `engine run` figure)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise InputError(f"the benchmark's image folder {root} is a file")
    # A manifest.json this module did not write is the user's file like any other.
    ours = set(manifest["files"]) | {MANIFEST_NAME} if manifest is not None else set()
    for left in leftover_temps(root / MANIFEST_NAME):  # a manifest write that was killed
        left.unlink(missing_ok=True)
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if p.name not in ours or p.is_dir())
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{root} holds files the benchmark did not generate ({shown}); it writes its image set "
                         f"there and removes what is not part of it, so give another --out (or empty that folder)")


def generate_image_set(root: Path, spec: ImageSetSpec) -> ImageSet:
    """Write (or reuse) the generated image set under ``root``: a new folder, or one that
    holds an earlier generated set and nothing else (see :func:`_check_ours`)."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    planned = _planned(spec)
    manifest = _read_manifest(manifest_path)
    _check_ours(root, manifest)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot make the benchmark's image folder {root}: {exc.strerror or exc}") from None
    if manifest is not None and manifest.get("complete") is not False and manifest.get("spec") == spec.to_json() \
            and _files_match(root, manifest):
        log.info("reusing the generated image set in %s", root)
    else:
        start = time.perf_counter()
        log.info("generating %d frames and %d crops in %s (seed %d)", spec.frames, spec.crops, root, spec.seed)
        # First a manifest that claims the earlier set's files and every planned one, so
        # that a run stopped half-way leaves a folder the next run still knows as its own.
        claimed = {**(manifest or {}).get("files", {}), **{name: None for name, *_ in planned}}
        _write_manifest(manifest_path, {"spec": spec.to_json(), "files": claimed, "complete": False})
        files = {}
        kind_codes = {ImageKind.FRAME: 0, ImageKind.CROP: 1}
        for name, kind, i, fmt in planned:
            rng = np.random.default_rng([spec.seed, kind_codes[kind], i])
            if kind is ImageKind.FRAME:
                w, h = spec.frame_size
            else:
                w, h = _crop_size(rng)
            data = encode(draw_image(rng, w, h, kind), fmt)
            (root / name).write_bytes(data)
            files[name] = hashlib.sha256(data).hexdigest()
        for stale in root.iterdir():  # the earlier set's files only (checked above)
            if stale.is_file() and stale.name != MANIFEST_NAME and stale.name not in files:
                stale.unlink()
        _write_manifest(manifest_path, {"spec": spec.to_json(), "files": files})
        log.info("generated %d images in %.1f s", len(planned), time.perf_counter() - start)
    paths = tuple(root / name for name, *_ in planned)
    counts: dict[str, int] = {}
    for name, kind, _, fmt in planned:
        counts[f"{kind.value}.{fmt}"] = counts.get(f"{kind.value}.{fmt}", 0) + 1
    return ImageSet(root, paths, "generated", spec, sum(p.stat().st_size for p in paths), counts)


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable image-set manifest %s (%s)", path, exc)
        return None
    spec = manifest.get("spec") if isinstance(manifest, dict) else None
    if not isinstance(spec, dict) or "generator_version" not in spec or not isinstance(manifest.get("files"), dict):
        log.warning("%s is not an image-set manifest this benchmark wrote", path)
        return None
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    write_bytes_atomic(path, json.dumps(manifest, indent=1).encode("utf-8"))


def _files_match(root: Path, manifest: dict) -> bool:
    for name, digest in manifest.get("files", {}).items():
        p = root / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            return False
    return bool(manifest.get("files"))


def folder_image_set(folder: Path, max_images: int | None = None) -> ImageSet:
    """The user's images (recursively, in the engine's discovery order). Files that do
    not decode (with PIL, as the reference decodes them) are left out and listed in
    ``excluded``: both sides must do the same work on every image, and a failed file
    costs the engine next to nothing while the reference would still run its model on
    a blank tensor, which would inflate the speedups."""
    from engine.discovery import iter_images
    from engine.preprocess.decode import ImageDecodeError, decode_rgba

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"benchmark image folder {folder} does not exist or is not a folder")
    paths: list[Path] = []
    excluded: dict[str, str] = {}
    for p in iter_images(folder):
        if max_images is not None and len(paths) >= max_images:
            break
        if not p.is_file():
            continue
        try:
            decode_rgba(p.read_bytes())
        except (ImageDecodeError, OSError) as exc:
            excluded[str(p.relative_to(folder))] = str(exc)
            continue
        paths.append(p)
    if excluded:
        log.warning("%d image(s) of %s do not decode and are left out: %s", len(excluded), folder,
                    "; ".join(f"{k}: {v}" for k, v in list(excluded.items())[:5]) + (" ..." if len(excluded) > 5 else ""))
    if not paths:
        what = f"no image that decodes ({len(excluded)} that do not)" if excluded else "no images"
        raise InputError(f"benchmark image folder {folder} holds {what}")
    counts: dict[str, int] = {}
    for p in paths:
        key = p.suffix.lower().lstrip(".")
        counts[key] = counts.get(key, 0) + 1
    return ImageSet(folder, tuple(paths), "folder", None, sum(p.stat().st_size for p in paths), counts, excluded)
