"""Kernel test cases of the GPU tests (test_gpu_kernels.py); the spec tables and
staged_batch are shared with the host emulation of the same sources
(test_host_emulation.py, which runs a smaller form of pil_long_filter_case), so both
check the same ground."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.specs import ChannelOrder, CropPosition, Interpolation, Preprocess, ResizeRule, SpecRegistry
from kernels.reference import CUBIC_A_PIL, Convention, Filter, Normalise, ResizeCrop


def opencv_specs() -> dict[str, Preprocess]:
    """antialias = false, the OpenCV convention: the gender spec, the quality spec without
    antialiasing, and variants (bilinear BGR with other mean/std, odd sizes, centre crop,
    squash with two filters, a one-pixel output)."""
    reg = SpecRegistry.builtin()
    gender = reg.get("gender").preprocess
    quality = dataclasses.replace(reg.get("quality").preprocess, antialias=False)
    return {
        "gender-lanczos": gender,
        "bilinear-bgr": dataclasses.replace(
            gender, interpolation=Interpolation.BILINEAR, channel_order=ChannelOrder.BGR, mean=(0.2, 0.4, 0.6), std=(0.3, 0.5, 0.7)
        ),
        "quality-bicubic": quality,
        "odd-size-37-centre-bicubic": dataclasses.replace(quality, size=37, crop=CropPosition.CENTER),
        "squash-29-bicubic": dataclasses.replace(quality, size=29, resize=ResizeRule.SQUASH),
        "squash-29-bilinear": dataclasses.replace(quality, size=29, resize=ResizeRule.SQUASH, interpolation=Interpolation.BILINEAR),
        "one-pixel": dataclasses.replace(quality, size=1),
    }


def pil_specs() -> dict[str, Preprocess]:
    """antialias = true, the PIL convention: the quality spec as built in, and variants
    (filters, BGR with other mean/std, top-left crop, squash, a one-pixel output)."""
    quality = SpecRegistry.builtin().get("quality").preprocess
    assert quality.antialias
    return {
        "quality": quality,
        "bilinear-bgr": dataclasses.replace(
            quality, interpolation=Interpolation.BILINEAR, channel_order=ChannelOrder.BGR, mean=(0.2, 0.4, 0.6), std=(0.3, 0.5, 0.7)
        ),
        "lanczos3-topleft-61": dataclasses.replace(quality, interpolation=Interpolation.LANCZOS, crop=CropPosition.TOP_LEFT, size=61),
        "squash-29-bicubic": dataclasses.replace(quality, size=29, resize=ResizeRule.SQUASH),
        "one-pixel-bicubic": dataclasses.replace(quality, size=1),
        "one-pixel-lanczos3": dataclasses.replace(quality, size=1, interpolation=Interpolation.LANCZOS),
    }


def pil_long_filter_case(filt: Filter) -> tuple[np.ndarray, ResizeCrop, Normalise]:
    """More taps than the kernel caches (kPilCache = 32): 16000 -> 384 columns is ~84-250
    taps per row, 900 -> 45 rows ~40-120; an off-centre window reaching the right edge."""
    image = np.random.default_rng(5).integers(0, 256, (900, 16000, 3), dtype=np.uint8)
    geom = ResizeCrop(900, 16000, 45, 384, 0, 384 - 45, 45)
    norm = Normalise(filt, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), CUBIC_A_PIL, Convention.PIL)
    return image, geom, norm


def staged_batch(images, pre: Preprocess, *, pitch_pad: int = 0, start: int = 256, reverse: bool = False):
    """``images`` (uint8 HWC RGB) laid out in one staging buffer as FrameProducer lays out
    frames (256-byte aligned; rows ``pitch_pad`` bytes longer than the pixels; in reverse
    order when ``reverse``, so that only the table says where each is), the batched
    kernel's geometry table behind them. Returns (staging, rows, table offset): ``rows``
    in batch order, (offset, pitch, geometry) each."""
    from kernels.launch import frame_table

    total = start + sum(-(-(im.shape[0] * (3 * im.shape[1] + pitch_pad) + 1) // 256) * 256 for im in images)
    staging = np.zeros(total + 256 * (1 + len(images) * 40 // 256), np.uint8)
    rows, offset = [None] * len(images), start
    for z in (reversed(range(len(images))) if reverse else range(len(images))):
        h, w, _ = images[z].shape
        pitch = 3 * w + pitch_pad
        staging[offset : offset + h * pitch].reshape(h, pitch)[:, : 3 * w] = images[z].reshape(h, 3 * w)
        rows[z] = (offset, pitch, ResizeCrop.from_preprocess(pre, h, w))
        offset += -(-(h * pitch + 1) // 256) * 256
    table = frame_table(rows)
    staging[offset : offset + table.nbytes] = table.view(np.uint8)
    return staging, rows, offset
