"""Kernel test cases shared by the GPU tests (test_gpu_kernels.py) and the host
emulation of the same sources (test_host_emulation.py), so both check the same ground."""

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
