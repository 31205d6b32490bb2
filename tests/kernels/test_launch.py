"""The argument tuples built by kernels.launch match the kernels' C signatures (CPU check
of what would otherwise only fail, silently, on a GPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import kernels
from engine.specs import SpecRegistry
from kernels.launch import (
    FRAME_GEOM_DTYPE,
    MAX_GRID_Z,
    POSTPROCESS_BLOCK,
    PREPROCESS_BLOCK,
    frame_table,
    postprocess_launch,
    preprocess_batch_launch,
    preprocess_launch,
)
from kernels.reference import CUBIC_A_OPENCV, CUBIC_A_PIL, Convention, Filter, Normalise, ResizeCrop

_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)', re.S)


def signatures() -> dict[str, list[str]]:
    """kernel name -> parameter C types, from every packaged source."""
    out: dict[str, list[str]] = {}
    for name in kernels.sources():
        for fn, params in _SIGNATURE.findall(kernels.load_source(name)):
            types = []
            for param in params.split(","):
                decl = " ".join(param.replace("__restrict__", "").split())
                types.append(decl.rsplit(" ", 1)[0].replace(" *", "*"))
            out[fn] = types
    return out


def parameter_names() -> dict[str, list[str]]:
    """kernel name -> parameter names, from every packaged source."""
    out: dict[str, list[str]] = {}
    for name in kernels.sources():
        for fn, params in _SIGNATURE.findall(kernels.load_source(name)):
            out[fn] = [param.split()[-1].lstrip("*") for param in params.split(",")]
    return out


def expected_numpy_type(c_type: str):
    if c_type.endswith("*"):
        return np.uintp
    return {"int": np.int32, "float": np.float32}[c_type]


def check(launch):
    sig = signatures()[launch.function]
    assert len(launch.args) == len(sig), (launch.function, sig)
    for i, (arg, c_type) in enumerate(zip(launch.args, sig)):
        assert type(arg) is expected_numpy_type(c_type), f"{launch.function} arg {i}: {type(arg)} for {c_type}"


def test_every_kernel_is_found():
    assert set(signatures()) == {"preprocess_u8_to_f16", "preprocess_u8_to_f32", "preprocess_batch_u8_to_f16",
                                 "preprocess_batch_u8_to_f32", "softmax_argmax_f32", "softmax_argmax_f16"}


@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_preprocess_arguments_match_the_signature(out_dtype):
    pre = SpecRegistry.builtin().get("gender").preprocess
    geom = ResizeCrop.from_preprocess(pre, 1080, 1920)
    launch = preprocess_launch(0x7F0000001000, 1920 * 3, geom, Normalise.from_preprocess(pre), 0x7F0000100000, 5, out_dtype)
    check(launch)
    assert launch.function.endswith({"float16": "f16", "float32": "f32"}[out_dtype])
    assert launch.block == PREPROCESS_BLOCK and launch.grid == (14, 14, 1)
    assert int(launch.args[0]) == 0x7F0000001000 and int(launch.args[-1]) == 5
    assert int(launch.args[9]) == int(Filter.LANCZOS4)
    assert int(launch.args[10]) == int(Convention.OPENCV) and float(launch.args[11]) == CUBIC_A_OPENCV


@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_preprocess_pil_convention_arguments(out_dtype):
    """The quality spec (antialias = true) packs convention 1 and PIL's a = -0.5, in the
    positions the signature names them."""
    pre = SpecRegistry.builtin().get("quality").preprocess
    launch = preprocess_launch(0x1000, 640 * 3, ResizeCrop.from_preprocess(pre, 480, 640), Normalise.from_preprocess(pre), 0x2000, 0, out_dtype)
    check(launch)
    names = parameter_names()[launch.function]
    assert names[9:12] == ["mode", "convention", "cubic_a"]
    assert int(launch.args[9]) == int(Filter.BICUBIC)
    assert int(launch.args[10]) == int(Convention.PIL) == 1
    assert float(launch.args[11]) == CUBIC_A_PIL
    assert launch.grid == (24, 24, 1)


@pytest.mark.parametrize("in_dtype", ["float16", "float32"])
def test_postprocess_arguments_match_the_signature(in_dtype):
    launch = postprocess_launch(1 << 40, 2 << 40, 3 << 40, rows=9, classes=1024, in_dtype=in_dtype, probabilities_input=True)
    check(launch)
    assert launch.block == POSTPROCESS_BLOCK and launch.block[0] % 32 == 0
    assert launch.grid == (3, 1, 1)  # 4 rows (warps) per block


def test_bad_launch_values_are_refused():
    pre = SpecRegistry.builtin().get("gender").preprocess
    geom = ResizeCrop.from_preprocess(pre, 300, 400)
    norm = Normalise.from_preprocess(pre)
    with pytest.raises(ValueError, match="pitch"):
        preprocess_launch(1, 400 * 3 - 1, geom, norm, 2, 0)
    with pytest.raises(ValueError, match="batch_index"):
        preprocess_launch(1, 400 * 3, geom, norm, 2, -1)
    with pytest.raises(ValueError, match="nothing to do"):
        postprocess_launch(1, 2, 3, rows=0, classes=4)


@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_batched_preprocess_arguments_match_the_signature(out_dtype):
    pre = SpecRegistry.builtin().get("quality").preprocess
    launch = preprocess_batch_launch(0x1000, 0x9000, 37, pre.size, Normalise.from_preprocess(pre), 0x2000, out_dtype)
    check(launch)
    names = parameter_names()[launch.function]
    assert names[:3] == ["base", "frames", "out_size"] and names[3:6] == ["mode", "convention", "cubic_a"]
    assert int(launch.args[1]) == 0x9000 and int(launch.args[-1]) == 0x2000
    assert launch.grid == (24, 24, 37) and launch.block == PREPROCESS_BLOCK


def _struct_layout() -> list[tuple[str, str]]:
    """(C type, name) of each FrameGeom field, from the kernel source."""
    body = re.search(r"struct FrameGeom \{(.*?)\};", kernels.load_source("preprocess"), re.S).group(1)
    fields = []
    for decl in re.sub(r"//[^\n]*", "", body).split(";"):
        decl = " ".join(decl.split())
        if decl:
            ctype, names = decl.split(" ", 1) if not decl.startswith("long long") else ("long long", decl[10:])
            fields += [(ctype, n.strip()) for n in names.split(",")]
    return fields


def test_the_frame_table_dtype_is_the_kernels_struct():
    """Same fields, order and sizes as struct FrameGeom (long long 8 bytes, int 4), no
    padding the compiler would add: 40 bytes, the 8-byte field first."""
    layout = _struct_layout()
    assert [n for _, n in layout] == list(FRAME_GEOM_DTYPE.names)
    sizes = {"long long": 8, "int": 4}
    assert [sizes[t] for t, _ in layout] == [FRAME_GEOM_DTYPE.fields[n][0].itemsize for n in FRAME_GEOM_DTYPE.names]
    assert FRAME_GEOM_DTYPE.itemsize == 40 and FRAME_GEOM_DTYPE.itemsize % 8 == 0


def test_frame_table_rows_and_refusals():
    pre = SpecRegistry.builtin().get("gender").preprocess
    a, b = ResizeCrop.from_preprocess(pre, 300, 400), ResizeCrop.from_preprocess(pre, 1080, 1920)
    table = frame_table([(4096, 400 * 3, a), (1 << 33, 1920 * 3 + 64, b)])
    assert table["offset"].tolist() == [4096, 1 << 33] and table["src_pitch"].tolist() == [1200, 5824]
    assert table[1]["resized_w"] == b.resized_w and table[1]["left"] == b.left and table["reserved"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="pitch"):
        frame_table([(0, 400 * 3 - 1, a)])
    with pytest.raises(ValueError, match="one output size"):
        frame_table([(0, 1200, a), (0, 384 * 3, ResizeCrop.from_preprocess(SpecRegistry.builtin().get("quality").preprocess, 384, 384))])
    with pytest.raises(ValueError, match="1 to"):
        frame_table([])
    with pytest.raises(ValueError, match="1 to"):
        preprocess_batch_launch(1, 2, MAX_GRID_Z + 1, 224, Normalise.from_preprocess(pre), 3)


def test_int_arguments_take_the_whole_int32_range_and_no_more():
    pre = SpecRegistry.builtin().get("gender").preprocess
    geom = ResizeCrop.from_preprocess(pre, 300, 400)
    norm = Normalise.from_preprocess(pre)
    top = np.iinfo(np.int32).max
    assert int(preprocess_launch(1, 1200, geom, norm, 2, top).args[-1]) == top
    with pytest.raises(ValueError, match=f"batch_index={top + 1} does not fit"):
        preprocess_launch(1, 1200, geom, norm, 2, top + 1)


def test_frame_table_refuses_a_negative_source_offset():
    geom = ResizeCrop.from_preprocess(SpecRegistry.builtin().get("gender").preprocess, 300, 400)
    with pytest.raises(ValueError, match="negative source offset -1"):
        frame_table([(0, 1200, geom), (-1, 1200, geom)])


def test_a_batched_launch_takes_up_to_max_grid_z_images():
    pre = SpecRegistry.builtin().get("gender").preprocess
    geom = ResizeCrop.from_preprocess(pre, 30, 40)
    assert len(frame_table([(0, 120, geom)] * MAX_GRID_Z)) == MAX_GRID_Z
    with pytest.raises(ValueError, match=f"1 to {MAX_GRID_Z} images, got {MAX_GRID_Z + 1}"):
        frame_table([(0, 120, geom)] * (MAX_GRID_Z + 1))
    launch = preprocess_batch_launch(1, 2, MAX_GRID_Z, pre.size, Normalise.from_preprocess(pre), 3)
    assert launch.grid[2] == MAX_GRID_Z
    with pytest.raises(ValueError, match="got 0"):
        preprocess_batch_launch(1, 2, 0, pre.size, Normalise.from_preprocess(pre), 3)


@pytest.mark.parametrize("rows,blocks", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_postprocess_grid_is_one_block_per_four_rows_rounded_up(rows, blocks):
    assert postprocess_launch(1, 2, 3, rows=rows, classes=2).grid == (blocks, 1, 1)


def test_postprocess_with_no_classes_is_refused():
    with pytest.raises(ValueError, match="nothing to do for 2 rows x 0 classes"):
        postprocess_launch(1, 2, 3, rows=2, classes=0)
