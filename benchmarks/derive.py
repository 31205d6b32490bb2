"""Figures derived from the measured results: speedups, the headline, label agreement."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from benchmarks.config import Pipeline, Scenario, Stage

_COMPARABLE = {
    Stage.PREPROCESS.value: Stage.PREPROCESS.value,
    Stage.INFERENCE.value: Stage.INFERENCE.value,
    Stage.END_TO_END.value: Stage.END_TO_END.value,
    Stage.ENGINE_RUN.value: Stage.END_TO_END.value,  # conservative: the engine side includes start-up and writing
}


def compute_speedups(configs: Sequence[dict], results: Sequence[dict]) -> list[dict]:
    """Engine median over reference median, for every matching (stage, scenario, model)
    on the same device."""
    by_id = {c["id"]: c for c in configs}
    index = {(r["config"], r["stage"], r["scenario"], r["model"]): r for r in results}
    out = []
    for r in results:
        c = by_id[r["config"]]
        if c["pipeline"] != Pipeline.ENGINE.value:
            continue
        for ref in configs:
            if ref["pipeline"] != Pipeline.REFERENCE.value or ref["device"] != c["device"]:
                continue
            base = index.get((ref["id"], _COMPARABLE[r["stage"]], r["scenario"], r["model"]))
            if base is None:
                continue
            out.append(
                {
                    "config": c["id"],
                    "reference": ref["id"],
                    "scenario": r["scenario"],
                    "stage": r["stage"],
                    "model": r["model"],
                    "ratio": r["images_per_s"]["median"] / base["images_per_s"]["median"],
                }
            )
    return out


def compute_headline(configs: Sequence[dict], results: Sequence[dict]) -> list[dict]:
    """Per scenario and device: the fastest engine end-to-end against the fastest reference."""
    by_id = {c["id"]: c for c in configs}
    best: dict[tuple[str, str, str], dict] = {}
    for r in results:
        if r["stage"] != Stage.END_TO_END.value:
            continue
        c = by_id[r["config"]]
        k = (r["scenario"], c["device"], c["pipeline"])
        if k not in best or r["images_per_s"]["median"] > best[k]["images_per_s"]["median"]:
            best[k] = r
    out = []
    for scenario in [s.value for s in Scenario]:
        for device in ("cpu", "cuda"):
            e = best.get((scenario, device, Pipeline.ENGINE.value))
            ref = best.get((scenario, device, Pipeline.REFERENCE.value))
            if e is None or ref is None:
                continue
            out.append(
                {
                    "scenario": scenario,
                    "device": device,
                    "engine_config": e["config"],
                    "engine_images_per_s": e["images_per_s"]["median"],
                    "reference_config": ref["config"],
                    "reference_images_per_s": ref["images_per_s"]["median"],
                    "ratio": e["images_per_s"]["median"] / ref["images_per_s"]["median"],
                }
            )
    return out


def compute_agreement(configs: Sequence[dict], outputs: Mapping[tuple[str, str], tuple[dict, list[int]]]) -> list[dict]:
    """How often the engine's label matches the reference's (same weights, each side's
    own preprocessing): a sanity check that both sides compute the same thing."""
    by_id = {c["id"]: c for c in configs}
    out = []
    for (cid, scenario), (probs, ok) in outputs.items():
        c = by_id.get(cid)
        if c is None or c["pipeline"] != Pipeline.ENGINE.value:
            continue
        for ref in configs:
            if ref["pipeline"] != Pipeline.REFERENCE.value or ref["device"] != c["device"] or ref["precision"] != "fp32":
                continue
            ref_out = outputs.get((ref["id"], scenario))
            if ref_out is None:
                continue
            ref_probs, ref_ok = ref_out
            common = sorted(set(ok) & set(ref_ok))
            pos = {i: j for j, i in enumerate(ok)}
            ref_pos = {i: j for j, i in enumerate(ref_ok)}
            for key in probs:
                if key not in ref_probs:
                    continue
                a = probs[key][[pos[i] for i in common]] if common else np.zeros((0, 1))
                b = ref_probs[key][[ref_pos[i] for i in common]] if common else np.zeros((0, 1))
                out.append(
                    {
                        "config": cid,
                        "reference": ref["id"],
                        "scenario": scenario,
                        "model": key,
                        "images": len(common),
                        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()) if common else None,
                        "max_abs_dp": float(np.abs(a - b).max()) if common else None,
                    }
                )
    return out
