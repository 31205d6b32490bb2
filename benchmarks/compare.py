"""Regression check: a new results file against a stored baseline.

Figures are paired by (configuration, stage, scenario, model). A pair regresses when
the new median images/s is below ``baseline * (1 - tolerance)``; with a memory
tolerance, also when peak host memory grew above ``baseline * (1 + tolerance)``.
Per-stage tolerances override the default (inference is steadier than end to end,
which shares the CPU with decoding). A figure in the baseline but not in the new file
is reported as missing and fails the check unless ``allow_missing``: a configuration
that silently stopped being measured is a regression of the suite itself.

Baselines are only meaningful on the same hardware and workload: a different GPU (or,
for CPU runs, CPU model) fails the check unless ``ignore_machine``; another image set
(source, count, kinds, generator settings) or other settings that move the figures
(batch size, device, threads, DataLoader workers, model variants) fail it unless
``ignore_workload``. A comparison in which no figure could be paired fails too: a suite
that measured nothing must not pass.

Library: :func:`compare` -> :class:`Comparison`. CLI: :func:`add_arguments` and
:func:`main` (``python -m benchmarks compare NEW BASELINE``); exit status 0 when no
regression, 1 on a regression, 2 on a user error (unreadable file, other schema).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

from benchmarks.schema import SCHEMA_VERSION
from engine.errors import InputError
from engine.fileio import user_path

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.10
EXIT_REGRESSION = 1

Key = tuple[str, str, "str | None", "str | None"]  # config, stage, scenario, model


class Verdict(str, Enum):
    OK = "ok"
    IMPROVED = "improved"
    REGRESSED = "regressed"
    MISSING = "missing"  # in the baseline, not in the new results
    NEW = "new"  # in the new results only (never a failure)


@dataclass(frozen=True)
class Tolerances:
    throughput: float = DEFAULT_TOLERANCE  # allowed relative drop of median images/s
    per_stage: Mapping[str, float] = field(default_factory=dict)
    memory: float | None = None  # allowed relative growth of peak host memory; None: not checked

    def __post_init__(self) -> None:
        for name, value in [("throughput", self.throughput), *self.per_stage.items()] + (
            [("memory", self.memory)] if self.memory is not None else []
        ):
            # a drop is a fraction below 1 (a drop of 100% could never fail); memory may grow more
            top = 10.0 if name == "memory" else 1.0
            if not 0.0 <= value < top:
                raise InputError(f"tolerance {name} must be a fraction from 0 up to (not including) {top:g}, got {value}")

    def for_stage(self, stage: str) -> float:
        return self.per_stage.get(stage, self.throughput)


@dataclass(frozen=True)
class Finding:
    key: Key
    verdict: Verdict
    baseline: float | None  # median images/s
    new: float | None
    change: float | None  # new / baseline - 1
    tolerance: float
    detail: str = ""

    def line(self) -> str:
        config, stage, scenario, model = self.key
        what = f"{config} {stage} {model or scenario or ''}".strip()
        if self.verdict in (Verdict.MISSING, Verdict.NEW):
            return f"{self.verdict.value.upper():9} {what}"
        pct = f"{self.change:+.1%}" if self.change is not None else "?"
        text = f"{self.verdict.value.upper():9} {what}: {self.baseline:.3g} -> {self.new:.3g} images/s ({pct}, tolerance -{self.tolerance:.0%})"
        return text + (f"; {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Comparison:
    findings: tuple[Finding, ...]
    machine_problems: tuple[str, ...]
    allow_missing: bool
    workload_problems: tuple[str, ...] = ()

    @property
    def regressions(self) -> list[Finding]:
        bad = {Verdict.REGRESSED} | (set() if self.allow_missing else {Verdict.MISSING})
        return [f for f in self.findings if f.verdict in bad]

    @property
    def compared(self) -> int:
        """Figures present in both files."""
        return len([f for f in self.findings if f.verdict not in (Verdict.NEW, Verdict.MISSING)])

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.machine_problems and not self.workload_problems and self.compared > 0

    def lines(self) -> list[str]:
        out = [f"machine mismatch: {p}" for p in self.machine_problems]
        out += [f"workload mismatch: {p}" for p in self.workload_problems]
        out += [f.line() for f in self.findings]
        n = self.compared
        if self.passed:
            out.append(f"PASS: {n} figure(s) compared, no drop beyond tolerance")
            return out
        regressed = len([f for f in self.regressions if f.verdict is Verdict.REGRESSED])
        missing = len(self.regressions) - regressed
        reasons = [f"{regressed} of {n} compared figure(s) regressed"]
        if missing:
            reasons.append(f"{missing} baseline figure(s) missing from the new results")
        if self.machine_problems:
            reasons.append(f"machine mismatch ({len(self.machine_problems)})")
        if self.workload_problems:
            reasons.append(f"workload mismatch ({len(self.workload_problems)})")
        if n == 0:
            reasons.append("no figure could be paired: nothing was compared")
        out.append("FAIL: " + "; ".join(reasons))
        return out


def _index(doc: Mapping) -> dict[Key, Mapping]:
    return {(r["config"], r["stage"], r["scenario"], r["model"]): r for r in doc["results"]}


def machine_mismatches(baseline: Mapping, new: Mapping) -> list[str]:
    """Why the two files were not measured on comparable hardware (empty if they were)."""
    a, b = baseline["machine"], new["machine"]
    problems = []
    ga, gb = a.get("gpu"), b.get("gpu")
    if (ga is None) != (gb is None):
        problems.append(f"baseline {'GPU ' + ga['name'] if ga else 'CPU only'}, new {'GPU ' + gb['name'] if gb else 'CPU only'}")
    elif ga is not None and ga["name"] != gb["name"]:
        problems.append(f"GPU differs: baseline {ga['name']}, new {gb['name']}")
    if ga is None and gb is None:
        if a["cpu"] != b["cpu"] or a["usable_cpus"] != b["usable_cpus"]:
            problems.append(
                f"CPU differs: baseline {a['cpu']} x{a['usable_cpus']}, new {b['cpu']} x{b['usable_cpus']}"
            )
    return problems


# settings that change the figures (repeats, rounds and warm-up only change their spread)
WORKLOAD_SETTINGS = ("batch_size", "device", "threads", "workers", "gender_variant", "quality_variant")
WORKLOAD_IMAGES = ("source", "count", "counts", "generator")


# a folder of the user's: which files (a generated set is named by its generator settings,
# and its bytes may differ by encoder version)
WORKLOAD_FOLDER = ("total_bytes", "listing_sha256")


def workload_mismatches(baseline: Mapping, new: Mapping) -> list[str]:
    """Why the two files did not measure the same work (empty if they did). Fields that
    one side lacks (written by an older suite) are not compared."""
    problems = []
    images_a, images_b = baseline.get("images") or {}, new.get("images") or {}
    folder = images_a.get("source") == images_b.get("source") == "folder"
    checks = [("settings", WORKLOAD_SETTINGS), ("images", WORKLOAD_IMAGES + (WORKLOAD_FOLDER if folder else ()))]
    for section, keys in checks:
        a, b = baseline.get(section) or {}, new.get(section) or {}
        for key in keys:
            if key in WORKLOAD_FOLDER and (key not in a or key not in b):
                continue
            if a.get(key) != b.get(key):
                problems.append(f"{section}.{key}: baseline {_short(a.get(key))}, new {_short(b.get(key))}")
    specs_a = {m["key"]: m.get("spec_sha256") for m in baseline.get("models") or []}
    specs_b = {m["key"]: m.get("spec_sha256") for m in new.get("models") or []}
    for key in sorted(set(specs_a) & set(specs_b)):
        if specs_a[key] and specs_b[key] and specs_a[key] != specs_b[key]:
            problems.append(f"models.{key}: another spec (preprocessing, labels or output kind; a --spec-file?)")
    return problems


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def compare(
    baseline: Mapping,
    new: Mapping,
    tolerances: Tolerances | None = None,
    *,
    allow_missing: bool = False,
    ignore_machine: bool = False,
    ignore_workload: bool = False,
) -> Comparison:
    """Compare two validated results documents (see :func:`benchmarks.suite.load_results`)."""
    tol = tolerances or Tolerances()
    for name, doc in (("baseline", baseline), ("new results", new)):
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise InputError(
                f"{name} use schema version {doc.get('schema_version')}, this compare reads {SCHEMA_VERSION}"
            )
    base_idx, new_idx = _index(baseline), _index(new)
    findings: list[Finding] = []
    for key, b in base_idx.items():
        t = tol.for_stage(key[1])
        n = new_idx.get(key)
        if n is None:
            findings.append(Finding(key, Verdict.MISSING, b["images_per_s"]["median"], None, None, t))
            continue
        bm, nm = b["images_per_s"]["median"], n["images_per_s"]["median"]
        change = nm / bm - 1.0
        verdict = Verdict.OK
        detail = ""
        if nm < bm * (1.0 - t):
            verdict = Verdict.REGRESSED
        elif change > t:
            verdict = Verdict.IMPROVED
        if tol.memory is not None and n["peak_host_mb"] > b["peak_host_mb"] * (1.0 + tol.memory):
            verdict = Verdict.REGRESSED
            detail = (
                f"peak host memory {b['peak_host_mb']:.0f} -> {n['peak_host_mb']:.0f} MB "
                f"(tolerance +{tol.memory:.0%})"
            )
        findings.append(Finding(key, verdict, bm, nm, change, t, detail))
    for key, n in new_idx.items():
        if key not in base_idx:
            findings.append(Finding(key, Verdict.NEW, None, n["images_per_s"]["median"], None, tol.for_stage(key[1])))
    problems = [] if ignore_machine else machine_mismatches(baseline, new)
    workload = [] if ignore_workload else workload_mismatches(baseline, new)
    return Comparison(tuple(findings), tuple(problems), allow_missing, tuple(workload))


# ----------------------------------------------------------------------------- CLI


def _stage_tolerance(text: str) -> tuple[str, float]:
    from benchmarks.schema import STAGES

    stage, sep, value = text.partition("=")
    if not sep or stage not in STAGES:
        raise argparse.ArgumentTypeError(f"expected STAGE=FRACTION with STAGE one of {STAGES}, got {text!r}")
    try:
        return stage, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("new", type=user_path, help="results.json of the run to check")
    parser.add_argument("baseline", type=user_path, help="stored baseline results.json")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"allowed drop of median images/s, as a fraction (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--stage-tolerance",
        type=_stage_tolerance,
        action="append",
        default=[],
        metavar="STAGE=FRACTION",
        help="tolerance for one stage (repeatable), e.g. end_to_end=0.15",
    )
    parser.add_argument("--memory-tolerance", type=float, help="also fail when peak host memory grows by more than this fraction")
    parser.add_argument("--allow-missing", action="store_true", help="figures absent from the new run do not fail the check")
    parser.add_argument("--ignore-machine", action="store_true", help="compare even if CPU/GPU differ from the baseline's")
    parser.add_argument(
        "--ignore-workload",
        action="store_true",
        help="compare even if the image set or settings that move the figures (batch size, device, threads, "
        "workers, variants) differ from the baseline's",
    )


def main(args: argparse.Namespace) -> int:
    """Print the comparison; 0 if it passes, 1 on a regression, a machine or workload
    mismatch, or when nothing could be compared.
    Unreadable or invalid files raise :class:`engine.errors.InputError` (exit 2 in the CLI)."""
    from benchmarks.suite import load_results

    tolerances = Tolerances(
        throughput=args.tolerance, per_stage=dict(args.stage_tolerance), memory=args.memory_tolerance
    )
    result = compare(
        load_results(args.baseline),
        load_results(args.new),
        tolerances,
        allow_missing=args.allow_missing,
        ignore_machine=args.ignore_machine,
        ignore_workload=args.ignore_workload,
    )
    for line in result.lines():
        print(line)
    return 0 if result.passed else EXIT_REGRESSION
