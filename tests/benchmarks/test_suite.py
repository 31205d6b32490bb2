"""A short benchmark run end to end on the CPU, its JSON validated against the schema.

Kept short for CI on two cores: a handful of small generated images, one repetition
per round, batch 2. The gender model (resnet18) runs the whole suite (warm-up, every stage,
`engine run`, plot); the quality model (caformer_s36, about a second per image here
even in ONNX Runtime) runs one image through the "both" scenario without warm-up, so
both classifiers and the decode-once branch are covered without minutes of CAFormer.
ONNX files come from the session's ``random_models``; each torch model is built once.
"""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path

import pytest

from benchmarks.config import BenchConfig, Pipeline, Scenario
from benchmarks.schema import validate_results
from benchmarks.suite import RESULTS_JSON, RESULTS_PLOT, RESULTS_SUMMARY, load_results, run_bench

pytest.importorskip("torch", reason="the reference pipeline needs torch")
pytest.importorskip("cv2", reason="the gender card's preprocessing uses OpenCV")

ENGINE = "engine/onnxruntime/cpu/fp32"
EXECUTOR = "engine/onnxruntime-executor/cpu/fp32"  # the streamed executor on its host device
REFERENCE = "reference/torch/cpu/fp32"


@pytest.fixture(scope="module")
def torch_gender():
    from benchmarks.torch_reference import build_reference_models
    from engine.specs import SpecRegistry

    return build_reference_models([SpecRegistry.builtin().get("gender", "alpha")])["gender/alpha"]


@pytest.fixture(scope="module")
def gender_run(tmp_path_factory, random_models, torch_gender):
    out = tmp_path_factory.mktemp("bench-gender")
    for name in (RESULTS_SUMMARY, RESULTS_PLOT):  # an earlier run's, also linked from elsewhere
        (out / name).write_bytes(b"an earlier run's " + name.encode())
        os.link(out / name, out.parent / f"{out.name}-earlier-{name}")
    config = BenchConfig(
        out_dir=out,
        frames=1,
        crops=2,  # 3 images in batches of 2: one full batch, one ragged
        frame_size=(320, 180),
        scenarios=(Scenario.GENDER,),
        device="cpu",
        batch_size=2,
        repeats=1,
        rounds=2,  # engine, reference, then reference, engine: two pooled timings per figure
        warmup_batches=1,
        workers=2,
        threads=2,
        cache_dir=out / "cache",
    )
    gender = random_models["gender/alpha"]  # resolved (and its warning said) before the log is watched
    handler = _ListHandler()
    logger = logging.getLogger("engine.models")
    logger.addHandler(handler)
    try:
        doc = run_bench(config, models={"gender/alpha": gender}, torch_models={"gender/alpha": torch_gender})
    finally:
        logger.removeHandler(handler)
    GENDER_RUN_LOG[:] = [r.getMessage() for r in handler.records]
    return out, doc


GENDER_RUN_LOG: list[str] = []  # what engine.models logged during gender_run


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _result(doc, config, stage, scenario=None, model=None):
    found = [
        r for r in doc["results"] if (r["config"], r["stage"], r["scenario"], r["model"]) == (config, stage, scenario, model)
    ]
    assert len(found) == 1, f"no single result for {config} {stage} {scenario} {model}"
    return found[0]


def test_json_is_written_and_valid(gender_run):
    out, doc = gender_run
    on_disk = load_results(out / RESULTS_JSON)  # validates against the schema
    assert on_disk == json.loads(json.dumps(doc))
    validate_results(doc)
    assert doc["settings"]["device"] == "cpu" and (doc["settings"]["repeats"], doc["settings"]["rounds"]) == (1, 2)
    assert doc["images"]["count"] == 3 and doc["images"]["source"] == "generated"
    assert doc["images"]["counts"] == {"frame.png": 1, "crop.png": 1, "crop.jpg": 1}
    assert doc["machine"]["cpu_count"] >= 1 and doc["packages"]["onnxruntime"]


def test_both_pipelines_measure_every_stage(gender_run):
    _, doc = gender_run
    assert [c["id"] for c in doc["configs"]] == [ENGINE, EXECUTOR, REFERENCE]
    for cid in (ENGINE, EXECUTOR, REFERENCE):
        for stage, scenario, model in (
            ("preprocess", "gender", None),
            ("inference", None, "gender/alpha"),
            ("end_to_end", "gender", None),
        ):
            r = _result(doc, cid, stage, scenario, model)
            assert r["images"] == 3
            assert len(r["seconds"]) == 2 and r["images_per_s"]["median"] > 0
            assert r["peak_host_mb"] > 50  # a Python process with torch loaded, at least
            assert r["peak_device_mb"] is None


def test_engine_run_is_timed(gender_run):
    _, doc = gender_run
    assert not doc["skipped"]
    r = _result(doc, ENGINE, "engine_run", "gender")
    assert r["images"] == 3 and "parquet" in r["note"]
    from benchmarks.report import markdown_summary

    assert "| engine_run vs the reference's end_to_end | gender |" in markdown_summary(doc)  # not a like-for-like row


def test_summary_names_dataloader_workers_only_where_the_reference_ran(gender_run):
    import copy

    from benchmarks.report import markdown_summary

    _, doc = gender_run
    assert f"{doc['settings']['workers']} DataLoader workers" in markdown_summary(doc)
    engine_only = copy.deepcopy(doc)
    engine_only["results"] = [r for r in doc["results"] if r["config"] != REFERENCE]
    assert "DataLoader" not in markdown_summary(engine_only)


def test_speedups_headline_and_agreement(gender_run):
    _, doc = gender_run
    e2e = {s["stage"]: s for s in doc["speedups"] if s["scenario"] in ("gender", None)}
    assert {"preprocess", "inference", "end_to_end"} <= set(e2e)
    engine = max(_result(doc, cid, "end_to_end", "gender")["images_per_s"]["median"] for cid in (ENGINE, EXECUTOR))
    reference = _result(doc, REFERENCE, "end_to_end", "gender")["images_per_s"]["median"]
    ratios = [s["ratio"] for s in doc["speedups"] if s["stage"] == "end_to_end" and s["scenario"] == "gender"]
    assert len(ratios) == 2 and max(ratios) == pytest.approx(engine / reference)
    (headline,) = doc["headline"]  # the fastest engine configuration against the reference
    assert headline["scenario"] == "gender" and headline["ratio"] == pytest.approx(engine / reference)
    agree = {a["config"]: a for a in doc["agreement"]}
    assert set(agree) == {ENGINE, EXECUTOR}
    # Same seeded weights on both sides: only the preprocessing libraries differ.
    assert agree[ENGINE]["images"] == 3 and agree[ENGINE]["max_abs_dp"] < 0.1
    # The executor runs the same ONNX on the same DALI views: the same probabilities.
    assert agree[EXECUTOR]["images"] == 3
    assert agree[EXECUTOR]["max_abs_dp"] == pytest.approx(agree[ENGINE]["max_abs_dp"], abs=1e-5)


def test_random_weights_warning_is_said_once(gender_run):
    # `engine run` is timed twice (two rounds) and resolves its model each time
    assert sum("RANDOM weights" in m for m in GENDER_RUN_LOG) == 1, "\n".join(GENDER_RUN_LOG)


def test_random_weights_are_labelled(gender_run):
    out, doc = gender_run
    (model,) = doc["models"]
    assert model["weights"] == "random" and "NOT the published model" in model["weights_detail"]
    assert any("RANDOM weights" in n for n in doc["notes"])
    summary = (out / RESULTS_SUMMARY).read_text()
    assert "random weights" in summary and "| gender | cpu |" in summary


def test_outputs_replace_the_earlier_files_instead_of_writing_into_them(gender_run):
    # written to a temporary file and renamed over the old one: a write that fails part-way
    # (no room) leaves the earlier file whole, and a link to it keeps the earlier content
    out, doc = gender_run
    names = [RESULTS_SUMMARY] + ([RESULTS_PLOT] if doc["outputs"]["plot"] else [])
    for name in names:
        earlier = out.parent / f"{out.name}-earlier-{name}"
        assert earlier.read_bytes() == b"an earlier run's " + name.encode()
        assert (out / name).read_bytes() != earlier.read_bytes()
    if not doc["outputs"]["plot"]:
        assert not (out / RESULTS_PLOT).exists()  # no plot this run: the earlier one is not kept either


def test_plot_or_reason(gender_run):
    out, doc = gender_run
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        assert doc["outputs"]["plot"] is None and "matplotlib" in doc["outputs"]["plot_skipped"]
        return
    plot = Path(doc["outputs"]["plot"])
    assert plot.parent == out and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_models_together_on_one_image(tmp_path, random_models, torch_gender):
    from benchmarks.torch_reference import build_reference_models
    from engine.specs import SpecRegistry

    torch_quality = build_reference_models([SpecRegistry.builtin().get("quality", "baseline")])["quality/baseline"]
    config = BenchConfig(
        out_dir=tmp_path,
        frames=0,
        crops=1,
        scenarios=(Scenario.BOTH,),
        pipelines=(Pipeline.ENGINE, Pipeline.REFERENCE),
        device="cpu",
        batch_size=1,
        repeats=1,
        warmup_batches=0,
        workers=1,
        threads=2,
        engine_run_check=False,
        plot=False,
        cache_dir=tmp_path / "cache",
        backends=("onnxruntime",),
    )
    doc = run_bench(
        config,
        models={k: random_models[k] for k in ("gender/alpha", "quality/baseline")},
        torch_models={"gender/alpha": torch_gender, "quality/baseline": torch_quality},
    )
    validate_results(load_results(tmp_path / RESULTS_JSON))
    for cid in (ENGINE, REFERENCE):
        assert _result(doc, cid, "end_to_end", "both")["images"] == 1
        assert _result(doc, cid, "preprocess", "both")["images"] == 1
        for key in ("gender/alpha", "quality/baseline"):
            assert _result(doc, cid, "inference", None, key)["images"] == 1
    assert {a["model"] for a in doc["agreement"]} == {"gender/alpha", "quality/baseline"}
    assert doc["outputs"]["plot"] is None and doc["outputs"]["plot_skipped"]
    assert [h["scenario"] for h in doc["headline"]] == ["both"]


def test_user_folder_with_an_undecodable_file(tmp_path, random_models, torch_gender):
    from benchmarks.images import ImageSetSpec, generate_image_set

    folder = tmp_path / "mine"
    generate_image_set(folder / "crops", ImageSetSpec(frames=0, crops=2, frame_size=(64, 36), seed=3))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.png").write_bytes(b"an earlier run's plot")
    config = BenchConfig(
        out_dir=tmp_path / "out",
        images=folder,
        scenarios=(Scenario.GENDER,),
        device="cpu",
        batch_size=2,
        repeats=1,
        rounds=2,  # the skip below is said once, not once per round
        warmup_batches=0,
        workers=0,  # the reference loads in the main process: also a supported setting
        engine_run_check=True,  # skipped, with the reason: engine run would take the bad file too
        plot=False,
        backends=("onnxruntime",),
    )
    doc = run_bench(config, models={"gender/alpha": random_models["gender/alpha"]}, torch_models={"gender/alpha": torch_gender})
    # the bad file is left out, and says so: both sides then do the same work on every image
    assert doc["images"]["source"] == "folder" and doc["images"]["count"] == 2
    assert doc["images"]["excluded"] == {"broken.jpg": "cannot decode: corrupt or unsupported JPEG header"}
    assert any("do not decode and were left out" in n for n in doc["notes"])
    assert [s["id"] for s in doc["skipped"]] == [f"{ENGINE} engine_run"]
    assert not any(r["stage"] == "engine_run" for r in doc["results"])
    for cid in (ENGINE, REFERENCE):
        assert _result(doc, cid, "end_to_end", "gender")["images"] == 2
        assert _result(doc, cid, "inference", None, "gender/alpha")["images"] == 2
    (agree,) = doc["agreement"]
    assert agree["images"] == 2
    assert not (tmp_path / "out" / "results.png").exists()  # no plot this time: the old one would pass for it
    listing = doc["images"]["listing_sha256"]
    assert len(listing) == 64 and all(len(m["spec_sha256"]) == 64 for m in doc["models"])
