"""The GPU workflow (.github/workflows/gpu-bench.yml) runs only on a self-hosted GPU
runner, so nothing here would notice a flag it passes that the CLI no longer takes.
Every `engine ...` and `python -m benchmarks ...` command of its steps is parsed with
the real argument parsers, its shell variables replaced by the values the job gives
them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="reading the workflow needs PyYAML (installed with timm)")

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "gpu-bench.yml"
# what the job's env and earlier steps set (inputs at their defaults)
VALUES = {
    "BENCH_OUT": "bench-results",
    "REPEATS": "5",
    "TOLERANCE": "0.10",
    "FRAMES": "64",
    "CROPS": "64",
    "ENGINE_CACHE_DIR": "/home/runner/.cache/anime-batch-engine-ci",
    "baseline": "benchmarks/baselines/nvidia-h200.json",
}


def _commands() -> list[list[str]]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    out = []
    for job in doc["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ")
            for line in script.splitlines():
                line = line.strip()
                if not (line.startswith("engine ") or line.startswith("python -m benchmarks ")):
                    continue
                line = line.split(" | ")[0]  # `... | tee FILE`
                line = re.sub(r"\$\{?(\w+)\}?", lambda m: VALUES[m.group(1)], line)
                out.append(shlex.split(line))
    return out


def test_every_cli_command_of_the_gpu_workflow_parses():
    from benchmarks.__main__ import build_parser as bench_parser
    from engine.cli import build_parser as engine_parser

    commands = _commands()
    seen = set()
    for argv in commands:
        if argv[0] == "engine":
            parser, args = engine_parser(), argv[1:]
        else:
            parser, args = bench_parser(), argv[3:]
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"the workflow's command does not parse: {shlex.join(argv)}")
        seen.add((argv[0], parsed.command))
    # the steps this check is for: images, the engine builds, the benchmark, the regression check
    assert {("engine", "build"), ("engine", "bench"), ("python", "images"), ("python", "compare")} <= seen, seen
