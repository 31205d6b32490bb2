"""The pins of the floor run: every lower bound pyproject.toml declares, as ``==``.

    python .ci/floor_pins.py [PYTHON]      (PYTHON: the floor Python, default 3.10)

prints one ``name==version`` line per requirement of the core install and of the test
extra that applies on Linux with that Python. `.ci/floor` installs exactly these and runs
the tests, so a bound that is no longer true (an API newer than it, a behaviour that
changed) fails CI instead of a user's install.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# Test-extra packages the floor run leaves out, each with its reason. Every other package
# of the core install and the test extra must declare exactly one ">=" bound.
LEFT_OUT = {
    "opencv-python-headless": "its oldest allowed release, 4.12, needs numpy 2, above the numpy floor; "
    "the OpenCV tests skip",
}


def floor_pins(pyproject: dict, python: str = "3.10") -> dict[str, str]:
    """Package name -> the lowest version pyproject allows, for Linux and ``python``."""
    project = pyproject["project"]
    env = {"python_version": python, "python_full_version": f"{python}.0", "platform_system": "Linux",
           "sys_platform": "linux", "os_name": "posix"}
    pins: dict[str, str] = {}
    for line in list(project["dependencies"]) + list(project["optional-dependencies"]["test"]):
        req = Requirement(line)
        if req.name in LEFT_OUT or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if len(lows) != 1 or len(req.specifier) != 1:
            raise ValueError(f"{req.name}: the floor run needs exactly one '>=' bound, got {str(req.specifier) or 'none'!r}")
        pins[req.name] = lows[0]
    return pins


def main(argv: list[str]) -> int:
    python = argv[0] if argv else "3.10"
    with open(ROOT / "pyproject.toml", "rb") as f:
        pins = floor_pins(tomllib.load(f), python)
    print("\n".join(f"{name}=={version}" for name, version in pins.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
