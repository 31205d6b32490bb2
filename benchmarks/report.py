"""Text views of a results document: the headline lines and a Markdown summary
(the form RESULTS.md collects)."""

from __future__ import annotations


def _device(doc: dict) -> str:
    m = doc["machine"]
    cpu = f"{m['cpu']}, {m['usable_cpus']} usable cores"
    if m.get("load_average"):
        cpu += f", load {m['load_average'][0]:.1f} at start"
    if m.get("gpu"):
        g = m["gpu"]
        return f"{g['name']} (driver {g['driver']}), host {cpu}"
    return f"CPU only: {cpu}"


def headline_lines(doc: dict) -> list[str]:
    lines = [f"device: {_device(doc)}", f"images: {doc['images']['count']} ({doc['images']['source']})"]
    for h in doc["headline"]:
        lines.append(
            f"{h['scenario']:>8} end to end on {h['device']}: engine {h['engine_images_per_s']:.2f} images/s "
            f"({h['engine_config']}) vs reference {h['reference_images_per_s']:.2f} ({h['reference_config']}): "
            f"x{h['ratio']:.2f}"
        )
    for s in doc["skipped"]:
        lines.append(f"skipped {s['id']}: {s['reason']}")
    lines.append("models ran with RANDOM weights: throughput only, predictions meaningless")
    out = doc["outputs"]
    lines.append(f"results: {out['json']}" + (f", plot: {out['plot']}" if out["plot"] else f" (no plot: {out['plot_skipped']})"))
    return lines


def _fmt_stats(r: dict) -> str:
    s = r["images_per_s"]
    return f"{s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} | {s['spread_pct']:.0f}%"


def _reference_ran(doc: dict) -> bool:
    """Whether a reference configuration (the one that has DataLoader workers) has results."""
    ref = {c["id"] for c in doc["configs"] if c["pipeline"] == "reference"}
    return any(r["config"] in ref for r in doc["results"])


def markdown_summary(doc: dict) -> str:
    st = doc["settings"]
    img = doc["images"]
    lines = [
        f"### {doc['created_utc'][:10]} - {_device(doc)}",
        "",
        f"- images: {img['count']} {img['source']} ({', '.join(f'{k}: {v}' for k, v in img['counts'].items())}), "
        f"{img['total_bytes'] / 1e6:.1f} MB",
        f"- batch {st['batch_size']}, {st['repeats']} repeats x {st['rounds']} round(s) (alternating order) "
        f"after {st['warmup_batches']} warm-up batches, "
        f"{st['threads']} threads" + (f", {st['workers']} DataLoader workers" if _reference_ran(doc) else ""),
        f"- engine {doc['suite']['engine_version']} ({doc['suite']['git_commit'] or 'unknown commit'}); "
        + ", ".join(f"{k} {v}" for k, v in doc["packages"].items() if v and k in ("torch", "onnxruntime", "nvidia-dali-cuda130", "tensorrt-cu13", "timm")),
        "- models: " + ", ".join(f"{m['key']} ({m['architecture']}, {m['weights']} weights)" for m in doc["models"]),
        "",
    ]
    if doc["headline"]:
        lines += ["| scenario | device | engine images/s | reference images/s | engine / reference |", "|---|---|---|---|---|"]
        for h in doc["headline"]:
            lines.append(
                f"| {h['scenario']} | {h['device']} | {h['engine_images_per_s']:.2f} ({h['engine_config']}) | "
                f"{h['reference_images_per_s']:.2f} ({h['reference_config']}) | **x{h['ratio']:.2f}** |"
            )
        lines.append("")
    lines += [
        "| configuration | stage | scenario / model | images/s median | min-max | spread | peak host MB (above open) | peak device MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        what = r["model"] or r["scenario"]
        dev = "-" if r["peak_device_mb"] is None else f"{r['peak_device_mb']:.0f}"
        lines.append(
            f"| {r['config']} | {r['stage']} | {what} | {_fmt_stats(r)} | {r['peak_host_mb']:.0f} "
            f"(+{r['peak_host_delta_mb']:.0f}) | {dev} |"
        )
    if doc["speedups"]:
        lines += ["", "| engine configuration | vs reference | stage | scenario / model | ratio |", "|---|---|---|---|---|"]
        for s in doc["speedups"]:
            stage = "engine_run vs the reference's end_to_end" if s["stage"] == "engine_run" else s["stage"]
            lines.append(f"| {s['config']} | {s['reference']} | {stage} | {s['model'] or s['scenario']} | x{s['ratio']:.2f} |")
    if doc["agreement"]:
        lines += ["", "| engine configuration | vs reference | scenario | model | images | same label | max abs dp |", "|---|---|---|---|---|---|---|"]
        for a in doc["agreement"]:
            agree = "-" if a["argmax_agreement"] is None else f"{a['argmax_agreement']:.1%}"
            dp = "-" if a["max_abs_dp"] is None else f"{a['max_abs_dp']:.2e}"
            lines.append(f"| {a['config']} | {a['reference']} | {a['scenario']} | {a['model']} | {a['images']} | {agree} | {dp} |")
    if doc["skipped"]:
        lines += [""] + [f"- skipped {s['id']}: {s['reason']}" for s in doc["skipped"]]
    lines += [""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)
