"""The regression check: pairing, tolerances, missing figures, machine mismatch, CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import compare as cmp
from benchmarks.compare import Tolerances, Verdict, compare
from benchmarks.schema import SCHEMA_VERSION, SchemaError, validate_results
from engine.errors import InputError
from tests.benchmarks.docs import ENGINE, REFERENCE, make_doc, scaled


def _verdicts(result) -> dict:
    return {f.key: f.verdict for f in result.findings}


def test_fixture_documents_are_schema_valid():
    validate_results(make_doc())
    validate_results(make_doc(gpu="NVIDIA H100 80GB HBM3"))


def test_identical_results_pass():
    doc = make_doc()
    result = compare(doc, doc)
    assert result.passed
    assert set(_verdicts(result).values()) == {Verdict.OK}
    assert result.lines()[-1].startswith("PASS: 6 figure(s) compared")


def test_drop_beyond_tolerance_fails_and_names_the_figure():
    base = make_doc()
    new = scaled(base, 0.8, stage="end_to_end", config=ENGINE)  # 20 % slower
    result = compare(base, new, Tolerances(throughput=0.10))
    assert not result.passed
    assert [f.key for f in result.regressions] == [(ENGINE, "end_to_end", "gender", None)]
    (bad,) = result.regressions
    assert bad.change == pytest.approx(-0.2)
    assert "REGRESSED" in bad.line() and "-20.0%" in bad.line()
    assert result.lines()[-1].startswith("FAIL: 1 of ")


def test_drop_within_tolerance_passes_and_gain_is_reported():
    base = make_doc()
    new = scaled(scaled(base, 0.95, config=ENGINE), 1.5, config=REFERENCE)
    result = compare(base, new, Tolerances(throughput=0.10))
    assert result.passed
    v = _verdicts(result)
    assert v[(ENGINE, "end_to_end", "gender", None)] is Verdict.OK
    assert v[(REFERENCE, "end_to_end", "gender", None)] is Verdict.IMPROVED


def test_boundary_is_inclusive():
    base = make_doc()
    assert compare(base, scaled(base, 0.9), Tolerances(throughput=0.10)).passed
    assert not compare(base, scaled(base, 0.89), Tolerances(throughput=0.10)).passed


def test_per_stage_tolerance_overrides_the_default():
    base = make_doc()
    new = scaled(base, 0.8, stage="end_to_end")
    assert not compare(base, new, Tolerances(throughput=0.10)).passed
    assert compare(base, new, Tolerances(throughput=0.10, per_stage={"end_to_end": 0.25})).passed
    # A tighter stage tolerance catches what the default lets through.
    assert not compare(base, scaled(base, 0.97, stage="inference"), Tolerances(0.10, {"inference": 0.02})).passed


def test_missing_figure_fails_unless_allowed_and_new_figure_never_fails():
    base = make_doc()
    new = make_doc()
    new["results"] = [r for r in new["results"] if r["stage"] != "inference"]
    result = compare(base, new)
    assert not result.passed
    assert {f.verdict for f in result.regressions} == {Verdict.MISSING}
    assert compare(base, new, allow_missing=True).passed
    # The other way round: figures only in the new run are reported, not failed.
    result = compare(new, base)
    assert result.passed
    assert sum(f.verdict is Verdict.NEW for f in result.findings) == 2


def test_memory_growth_is_checked_only_when_asked():
    key = (ENGINE, "end_to_end", "gender", None)
    base = make_doc(memory={key: 1000.0})
    new = make_doc(memory={key: 1300.0})
    assert compare(base, new).passed
    result = compare(base, new, Tolerances(memory=0.2))
    assert [f.key for f in result.regressions] == [key]
    assert "peak host memory 1000 -> 1300 MB" in result.regressions[0].line()
    assert compare(base, new, Tolerances(memory=0.5)).passed


def test_other_hardware_fails_unless_ignored():
    h100 = make_doc(gpu="NVIDIA H100 80GB HBM3")
    assert not compare(h100, make_doc(gpu="NVIDIA H200")).passed
    assert not compare(h100, make_doc()).passed  # GPU baseline, CPU-only run
    assert not compare(make_doc(cpu="A"), make_doc(cpu="B")).passed
    result = compare(h100, make_doc(gpu="NVIDIA H200"), ignore_machine=True)
    assert result.passed and not result.machine_problems


def test_another_workload_fails_unless_ignored():
    base = make_doc()
    for section, key, value in [("settings", "batch_size", 64), ("images", "count", 1000),
                                ("images", "source", "folder"), ("settings", "threads", 16)]:
        new = make_doc()
        new[section][key] = value
        result = compare(base, new)
        assert not result.passed and not result.regressions, key
        assert result.workload_problems == (f"{section}.{key}: baseline {base[section][key]!r}, new {value!r}",)
        assert any(line.startswith(f"workload mismatch: {section}.{key}") for line in result.lines())
        assert "workload mismatch (1)" in result.lines()[-1]
        assert compare(base, new, ignore_workload=True).passed
    new = make_doc()
    new["settings"]["repeats"] = 9  # changes the spread, not the figures
    assert compare(base, new).passed


def test_nothing_compared_fails():
    empty = make_doc(figures={})
    result = compare(empty, empty)
    assert not result.passed and result.compared == 0
    assert result.lines()[-1] == "FAIL: 0 of 0 compared figure(s) regressed; no figure could be paired: nothing was compared"


def test_fail_line_counts_regressions_and_missing_apart():
    base = make_doc()
    new = scaled(make_doc(), 0.5, stage="end_to_end")
    new["results"] = [r for r in new["results"] if r["stage"] != "inference"]
    line = compare(base, new).lines()[-1]
    assert line == "FAIL: 2 of 4 compared figure(s) regressed; 2 baseline figure(s) missing from the new results"


def test_other_schema_version_is_a_user_error():
    new = make_doc()
    new["schema_version"] = 999
    with pytest.raises(InputError, match="schema version 999"):
        compare(make_doc(), new)


def test_tolerance_must_be_a_fraction():
    with pytest.raises(InputError):
        Tolerances(throughput=-0.1)
    with pytest.raises(InputError):
        Tolerances(per_stage={"end_to_end": 50.0})
    with pytest.raises(InputError, match="not including"):
        Tolerances(throughput=1.0)  # a drop of 100% could never fail
    assert Tolerances(memory=2.0).memory == 2.0  # memory may grow by more than 100%


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cmp.add_arguments(parser)
    return cmp.main(parser.parse_args(argv))


def test_cli_exit_codes(tmp_path, capsys):
    base_path, new_path = tmp_path / "base.json", tmp_path / "new.json"
    base = make_doc()
    base_path.write_text(json.dumps(base))
    new_path.write_text(json.dumps(scaled(base, 0.5, config=ENGINE)))
    assert _run_cli([str(base_path), str(base_path)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert _run_cli([str(new_path), str(base_path)]) == cmp.EXIT_REGRESSION
    out = capsys.readouterr().out
    assert out.count("REGRESSED") == 3 and "FAIL: 3 of 6 compared figure(s) regressed" in out
    assert _run_cli([str(new_path), str(base_path), "--tolerance", "0.6"]) == 0
    assert _run_cli([str(new_path), str(base_path), "--stage-tolerance", "end_to_end=0.6"]) == cmp.EXIT_REGRESSION


def test_cli_rejects_bad_stage_tolerance(tmp_path):
    with pytest.raises(SystemExit):
        _run_cli(["a.json", "b.json", "--stage-tolerance", "warp=0.1"])


def test_cli_unreadable_or_invalid_files_are_user_errors(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_doc()))
    with pytest.raises(InputError, match="cannot read"):
        _run_cli([str(tmp_path / "absent.json"), str(good)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        _run_cli([str(broken), str(good)])
    invalid = tmp_path / "invalid.json"
    doc = make_doc()
    del doc["machine"]
    invalid.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="missing 'machine'"):
        _run_cli([str(invalid), str(good)])


def test_module_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    from benchmarks.__main__ import main

    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_doc()))
    assert main(["compare", str(good), str(good)]) == 0
    assert main(["compare", str(tmp_path / "nope.json"), str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmarks: error: cannot read")


# -- the schema validator itself --------------------------------------------------------------


def test_schema_reports_type_enum_and_reference_problems():
    doc = make_doc()
    doc["results"][0]["images_per_s"]["median"] = "fast"
    doc["results"][1]["stage"] = "warp"
    doc["configs"][0]["extra"] = 1
    with pytest.raises(SchemaError) as info:
        validate_results(doc)
    problems = info.value.problems
    assert any("results[0].images_per_s.median: expected number" in p for p in problems)
    assert any("results[1].stage: 'warp' is not one of" in p for p in problems)
    assert any("configs[0]: unexpected 'extra'" in p for p in problems)


def test_schema_cross_checks():
    doc = make_doc()
    doc["results"][0]["config"] = "engine/nothing/cpu/fp32"
    doc["results"][1]["model"] = None  # an inference result must name its model
    doc["results"][2]["seconds"] = doc["results"][2]["seconds"][:1]  # not `repeats` timings
    with pytest.raises(SchemaError) as info:
        validate_results(doc)
    text = " ".join(info.value.problems)
    assert "unknown config 'engine/nothing/cpu/fp32'" in text
    assert "inference result names its model" in text
    assert "1 timings, settings say 3 (repeats x rounds)" in text


def test_schema_rejects_non_finite_numbers():
    doc = make_doc()
    doc["results"][0]["peak_host_mb"] = float("nan")
    with pytest.raises(SchemaError, match="not a finite number"):
        validate_results(doc)


def _dup_result(doc):
    doc["results"].append(dict(doc["results"][0]))


def _headline(doc, **fields):
    doc["headline"] = [dict({"scenario": "gender", "device": "cpu", "engine_config": ENGINE, "engine_images_per_s": 40.0,
                             "reference_config": REFERENCE, "reference_images_per_s": 15.0, "ratio": 40 / 15}, **fields)]


def _speedup(doc, **fields):
    doc["speedups"] = [dict({"config": ENGINE, "reference": REFERENCE, "scenario": "gender", "stage": "end_to_end",
                             "model": None, "ratio": 40 / 15}, **fields)]


@pytest.mark.parametrize(
    "defect, message",
    [
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "$.schema_version: expected 1"),
        (lambda d: d["settings"].update(batch_size=4.0), "$.settings.batch_size: expected integer"),
        (lambda d: d["settings"].update(repeats=True), "$.settings.repeats: expected integer"),
        (lambda d: d["results"][0]["seconds"].__setitem__(0, 0.0), "$.results[0].seconds[0]: 0.0 must be > 0"),
        (lambda d: d["results"][0].update(peak_host_delta_mb=-1.0), "$.results[0].peak_host_delta_mb: -1.0 < minimum 0"),
        (lambda d: d["results"][0].update(peak_host_mb=float("inf")), "$.results[0].peak_host_mb: not a finite number"),
        (lambda d: d.update(models=[]), "$.models: needs at least 1 item(s)"),
        (lambda d: d["results"][0].pop("images"), "$.results[0]: missing 'images'"),
        (lambda d: d["results"][0]["images_per_s"].update(min=1e6), "images_per_s not ordered"),
        (_dup_result, "duplicate result"),
        (lambda d: d["results"][0].update(scenario=None), "only inference results have no scenario"),
        (lambda d: d["results"][1].update(model="quality/baseline"), "unknown model 'quality/baseline'"),
        (lambda d: _headline(d, engine_config="engine/nothing/cpu/fp32"), "unknown engine_config 'engine/nothing/cpu/fp32'"),
        (lambda d: _headline(d, reference_config="reference/x/cpu/fp32"), "unknown reference_config 'reference/x/cpu/fp32'"),
        (lambda d: _speedup(d, reference="reference/x/cpu/fp32"), "$.speedups[0]: unknown reference 'reference/x/cpu/fp32'"),
    ],
    ids=["version", "float-integer", "bool-integer", "zero-seconds", "negative-delta", "infinite", "no-models",
         "missing-field", "unordered-stats", "duplicate", "scenario-less", "unknown-model", "headline-engine",
         "headline-reference", "speedup-reference"],
)
def test_schema_refuses_each_defect_on_its_own(defect, message):
    doc = make_doc()
    _headline(doc)
    _speedup(doc)
    validate_results(doc)  # valid with a headline and a speedup
    defect(doc)
    with pytest.raises(SchemaError) as info:
        validate_results(doc)
    assert any(message in p for p in info.value.problems), info.value.problems

def test_two_folders_of_the_same_counts_are_another_workload():
    """A user's folder is named by its files (path, size), not only by its counts: a
    folder of 4K images in place of small ones is not a regression of the code."""
    base = make_doc()
    base["images"].update(source="folder", total_bytes=200_000, listing_sha256="a" * 64)
    other = make_doc()
    other["images"].update(source="folder", total_bytes=3_800_000, listing_sha256="b" * 64)
    result = compare(base, other)
    assert not result.passed and not result.regressions
    assert [p.split(":")[0] for p in result.workload_problems] == ["images.total_bytes", "images.listing_sha256"]
    older = make_doc()  # written before the listing was recorded: not compared, not failed
    older["images"].update(source="folder", total_bytes=200_000)
    assert compare(older, base).passed
    regenerated = make_doc()  # a generated set: named by its generator settings, bytes may differ
    regenerated["images"]["total_bytes"] = 2
    assert compare(make_doc(), regenerated).passed


def test_another_spec_of_a_model_is_another_workload():
    base, new = make_doc(), make_doc()
    base["models"][0]["spec_sha256"], new["models"][0]["spec_sha256"] = "a" * 64, "b" * 64
    result = compare(base, new)
    assert not result.passed and result.workload_problems == (
        "models.gender/alpha: another spec (preprocessing, labels or output kind; a --spec-file?)",)
    new["models"][0]["spec_sha256"] = "a" * 64
    assert compare(base, new).passed
    validate_results(new)


def test_figures_of_two_models_in_one_stage_are_paired_apart():
    """The inference stage has one figure per model: a regression of one model is not
    hidden behind the other's figure."""
    figures = {(ENGINE, "inference", None, "gender/alpha"): 60.0, (ENGINE, "inference", None, "quality/baseline"): 8.0}
    base = make_doc(figures)
    new = make_doc({**figures, (ENGINE, "inference", None, "gender/alpha"): 30.0})
    result = compare(base, new)
    assert result.compared == 2
    assert [f.key for f in result.regressions] == [(ENGINE, "inference", None, "gender/alpha")]
    assert _verdicts(result)[(ENGINE, "inference", None, "quality/baseline")] is Verdict.OK


def test_another_number_of_usable_cpus_is_other_hardware():
    """The same CPU model with other usable cores (a container's CPU limit) moves every
    CPU figure."""
    base, new = make_doc(), make_doc()
    new["machine"]["usable_cpus"] = 8
    result = compare(base, new)
    assert not result.passed and result.machine_problems == ("CPU differs: baseline Test CPU x2, new Test CPU x8",)
    assert compare(base, new, ignore_machine=True).passed


# spelt out, not taken from compare.WORKLOAD_SETTINGS: a setting dropped there must fail here
@pytest.mark.parametrize("key", ["batch_size", "device", "threads", "workers", "gender_variant", "quality_variant"])
def test_every_workload_setting_is_compared(key):
    base, new = make_doc(), make_doc()
    base["settings"][key], new["settings"][key] = "before", "after"
    result = compare(base, new)
    assert result.workload_problems == (f"settings.{key}: baseline 'before', new 'after'",)
    assert not result.passed and compare(base, new, ignore_workload=True).passed


def test_cli_memory_tolerance_is_applied(tmp_path, capsys):
    key = (ENGINE, "end_to_end", "gender", None)
    base_path, new_path = tmp_path / "base.json", tmp_path / "new.json"
    base_path.write_text(json.dumps(make_doc(memory={key: 1000.0})))
    new_path.write_text(json.dumps(make_doc(memory={key: 1300.0})))
    assert _run_cli([str(new_path), str(base_path)]) == 0  # not checked unless asked
    assert _run_cli([str(new_path), str(base_path), "--memory-tolerance", "0.2"]) == cmp.EXIT_REGRESSION
    assert "peak host memory 1000 -> 1300 MB" in capsys.readouterr().out
    assert _run_cli([str(new_path), str(base_path), "--memory-tolerance", "0.5"]) == 0


def test_memory_growth_boundary_is_inclusive():
    """As for throughput: growth of exactly the tolerance passes."""
    key = (ENGINE, "end_to_end", "gender", None)
    base = make_doc(memory={key: 1000.0})
    assert compare(base, make_doc(memory={key: 1200.0}), Tolerances(memory=0.2)).passed
    assert not compare(base, make_doc(memory={key: 1201.0}), Tolerances(memory=0.2)).passed


def test_a_gain_of_exactly_the_tolerance_is_not_yet_improved():
    base = make_doc()
    new = scaled(base, 1.25, stage="end_to_end")  # 40 -> 50 and 15 -> 18.75 images/s: +25% exactly
    v = _verdicts(compare(base, new, Tolerances(throughput=0.10, per_stage={"end_to_end": 0.25})))
    assert v[(ENGINE, "end_to_end", "gender", None)] is Verdict.OK
    assert v[(REFERENCE, "end_to_end", "gender", None)] is Verdict.OK


def test_a_zero_tolerance_is_allowed_and_fails_any_drop():
    base = make_doc()
    assert compare(base, base, Tolerances(throughput=0.0)).passed
    assert not compare(base, scaled(base, 0.999, stage="inference"), Tolerances(throughput=0.0)).passed


def test_module_cli_without_a_command_prints_help_and_fails(capsys):
    from benchmarks.__main__ import main

    assert main([]) == 2
    assert "usage: python -m benchmarks" in capsys.readouterr().out
