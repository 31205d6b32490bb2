"""`.ci/floor` runs the tests on the oldest Python with every dependency at its declared
lower bound; `.ci/floor_pins.py` turns pyproject's bounds into its pins. These check the
pins on made-up projects and on the real pyproject, and that the floor script follows
the Python that pyproject promises."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_python_floor import FLOOR

ROOT = Path(__file__).resolve().parent.parent


def _pins_module():
    spec = importlib.util.spec_from_file_location("floor_pins", ROOT / ".ci" / "floor_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project(dependencies, test=()):
    return {"project": {"dependencies": list(dependencies), "optional-dependencies": {"test": list(test), "torch": ["torch==9"]}}}


def test_each_lower_bound_becomes_a_pin_for_the_python_and_linux():
    pins = _pins_module().floor_pins(_project(
        ["numpy>=1.26", "tomli>=1.1; python_version < '3.11'", "dali>=2.2; platform_system == 'Linux'",
         "winonly>=1; platform_system == 'Windows'", "Pillow >= 11.0"],
        ["pytest>=8", "opencv-python-headless>=4.12"],
    ))
    assert pins == {"numpy": "1.26", "tomli": "1.1", "dali": "2.2", "Pillow": "11.0", "pytest": "8"}
    assert "tomli" not in _pins_module().floor_pins(_project(["tomli>=1.1; python_version < '3.11'"]), "3.11")


@pytest.mark.parametrize("requirement", ["numpy", "numpy<3", "numpy>=1.26,<3", "numpy==1.26", "numpy~=1.26"])
def test_a_requirement_without_exactly_one_lower_bound_is_refused(requirement):
    with pytest.raises(ValueError, match=r"^numpy: the floor run needs exactly one '>=' bound"):
        _pins_module().floor_pins(_project([requirement]))


def test_the_real_pyproject_pins_every_core_and_test_dependency_but_those_left_out():
    module = _pins_module()
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "floor_pins.py"), "3.10"],
                         capture_output=True, text=True, check=True).stdout.split()
    pins = dict(line.split("==") for line in out)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for name in ("numpy", "onnx", "onnxruntime", "polars", "nvidia-dali-cuda130", "pillow", "tomli", "pytest"):
        bound = re.search(rf'"{re.escape(name)}>=([0-9.]+)', text).group(1)
        assert pins[name] == bound, name
    assert "torch" not in pins and set(module.LEFT_OUT).isdisjoint(pins)


def test_the_floor_script_uses_the_python_pyproject_promises():
    # FLOOR is the Python that test_python_floor holds pyproject's requires-python to
    script = (ROOT / ".ci" / "floor").read_text()
    assert re.search(r"^FLOOR=(\S+)$", script, re.M).group(1) == ".".join(map(str, FLOOR))
    assert "bash .ci/floor" in (ROOT / ".ci" / "run").read_text()  # and CI runs it
