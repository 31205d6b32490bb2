"""Argument packing and launch shapes for the kernels (no CUDA here).

pycuda packs each argument by its NumPy type, so a Python ``int`` where the kernel takes
``int`` (or an int32 where it takes a pointer) would be a silent garbage launch. These
functions build the exact argument tuples; ``tests/kernels/test_launch.py`` checks them
against the signatures declared in the .cu files, on the CPU.

Pointers are passed as ``numpy.uintp`` of the device address (``int(allocation)`` for a
pycuda ``DeviceAllocation``, ``gpuarray.ptr``, or any integer address).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from kernels.reference import Normalise, ResizeCrop

OutDtype = Literal["float16", "float32"]
InDtype = Literal["float16", "float32"]

PREPROCESS_BLOCK = (16, 16, 1)
ROWS_PER_BLOCK = 4  # postprocess: one warp per row
POSTPROCESS_BLOCK = (32 * ROWS_PER_BLOCK, 1, 1)
INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``module.get_function(function)(*args, block=block, grid=grid)``."""

    function: str
    args: tuple
    block: tuple[int, int, int]
    grid: tuple[int, int, int]


def _i32(value: int, what: str) -> np.int32:
    if not 0 <= int(value) <= INT32_MAX:
        raise ValueError(f"{what}={value} does not fit the kernel's int argument")
    return np.int32(value)


def _ptr(address: int) -> np.uintp:
    return np.uintp(int(address))


def _norm_args(norm: Normalise) -> tuple:
    """The view's filter and normalisation, in both preprocess kernels' argument order
    (mode, convention, cubic_a, swap_rb, mean0..2, std0..2)."""
    return (
        _i32(int(norm.filter), "mode"),
        _i32(int(norm.convention), "convention"),
        np.float32(norm.cubic_a),
        _i32(1 if norm.swap_rb else 0, "swap_rb"),
        *(np.float32(m) for m in norm.mean),
        *(np.float32(s) for s in norm.std),
    )


def _pixel_grid(size: int, images: int = 1) -> tuple[int, int, int]:
    """One thread per output pixel of an S x S view (``images`` of them along z)."""
    bx, by, _ = PREPROCESS_BLOCK
    return (-(-size // bx), -(-size // by), int(images))


def preprocess_launch(
    src: int,
    src_pitch: int,
    geom: ResizeCrop,
    norm: Normalise,
    out: int,
    batch_index: int,
    out_dtype: OutDtype = "float16",
) -> Launch:
    """Launch writing image ``batch_index`` of an NCHW (batch, 3, S, S) buffer at ``out``
    from the uint8 HWC RGB image at ``src`` whose rows are ``src_pitch`` bytes apart."""
    if src_pitch < 3 * geom.src_w:
        raise ValueError(f"pitch {src_pitch} is shorter than a row of {geom.src_w} RGB pixels")
    function = {"float16": "preprocess_u8_to_f16", "float32": "preprocess_u8_to_f32"}[out_dtype]
    args = (
        _ptr(src),
        _i32(geom.src_h, "src_h"),
        _i32(geom.src_w, "src_w"),
        _i32(src_pitch, "src_pitch"),
        _i32(geom.resized_h, "resized_h"),
        _i32(geom.resized_w, "resized_w"),
        _i32(geom.top, "top"),
        _i32(geom.left, "left"),
        _i32(geom.size, "out_size"),
        *_norm_args(norm),
        _ptr(out),
        _i32(batch_index, "batch_index"),
    )
    return Launch(function, args, PREPROCESS_BLOCK, _pixel_grid(geom.size))


# The batched kernel's per-image geometry (struct FrameGeom in preprocess.cu): 40 bytes.
FRAME_GEOM_DTYPE = np.dtype([
    ("offset", "<i8"), ("src_h", "<i4"), ("src_w", "<i4"), ("src_pitch", "<i4"), ("resized_h", "<i4"),
    ("resized_w", "<i4"), ("top", "<i4"), ("left", "<i4"), ("reserved", "<i4"),
])
MAX_GRID_Z = 65535  # CUDA's limit on gridDim.z: images per batched launch


def frame_table(frames: Sequence[tuple[int, int, ResizeCrop]]) -> np.ndarray:
    """The batched kernel's geometry table for ``frames``, in batch order: per image
    (byte offset of its first row from the staging base, row pitch in bytes, geometry).
    Every image must have the same output size."""
    if not 1 <= len(frames) <= MAX_GRID_Z:
        raise ValueError(f"a batched launch takes 1 to {MAX_GRID_Z} images, got {len(frames)}")
    sizes = {geom.size for _, _, geom in frames}
    if len(sizes) != 1:
        raise ValueError(f"one batched launch writes one output size, got {sorted(sizes)}")
    table = np.zeros(len(frames), FRAME_GEOM_DTYPE)
    for row, (offset, pitch, geom) in zip(table, frames):
        if pitch < 3 * geom.src_w:
            raise ValueError(f"pitch {pitch} is shorter than a row of {geom.src_w} RGB pixels")
        if offset < 0:
            raise ValueError(f"negative source offset {offset}")
        row["offset"] = offset
        for name in ("src_h", "src_w", "resized_h", "resized_w", "top", "left"):
            row[name] = _i32(getattr(geom, name), name)
        row["src_pitch"] = _i32(pitch, "src_pitch")
    return table


def preprocess_batch_launch(
    base: int,
    table: int,
    count: int,
    size: int,
    norm: Normalise,
    out: int,
    out_dtype: OutDtype = "float16",
) -> Launch:
    """One launch writing images 0..count-1 of an NCHW (batch, 3, S, S) buffer at ``out``:
    image z from ``base + table[z].offset`` with geometry ``table[z]`` (a
    :func:`frame_table` already on the device at address ``table``)."""
    if not 1 <= count <= MAX_GRID_Z:
        raise ValueError(f"a batched launch takes 1 to {MAX_GRID_Z} images, got {count}")
    function = {"float16": "preprocess_batch_u8_to_f16", "float32": "preprocess_batch_u8_to_f32"}[out_dtype]
    args = (
        _ptr(base),
        _ptr(table),
        _i32(size, "out_size"),
        *_norm_args(norm),
        _ptr(out),
    )
    return Launch(function, args, PREPROCESS_BLOCK, _pixel_grid(size, count))


def postprocess_launch(
    raw: int,
    probs: int,
    argmax: int,
    rows: int,
    classes: int,
    in_dtype: InDtype = "float32",
    probabilities_input: bool = False,
) -> Launch:
    """Launch for a contiguous (rows, classes) buffer at ``raw``; writes float32
    probabilities at ``probs`` and int32 argmax at ``argmax``."""
    if rows <= 0 or classes <= 0:
        raise ValueError(f"nothing to do for {rows} rows x {classes} classes")
    function = {"float32": "softmax_argmax_f32", "float16": "softmax_argmax_f16"}[in_dtype]
    args = (
        _ptr(raw),
        _ptr(probs),
        _ptr(argmax),
        _i32(rows, "rows"),
        _i32(classes, "classes"),
        _i32(1 if probabilities_input else 0, "probabilities_input"),
    )
    grid = (-(-rows // ROWS_PER_BLOCK), 1, 1)
    return Launch(function, args, POSTPROCESS_BLOCK, grid)
