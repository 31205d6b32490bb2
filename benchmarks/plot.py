"""A PNG comparing the measured configurations (matplotlib, extra ``bench``).

Three panels of grouped bars (median images/s, whiskers from the slowest to the fastest
repetition): end to end per scenario, preprocessing per scenario, inference per model.
One bar colour per configuration; reference configurations hatched.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from engine.errors import DependencyError
from engine.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

_PANELS = (
    ("end_to_end", "scenario", "End to end (files -> labels)"),
    ("preprocess", "scenario", "Decode + preprocess"),
    ("inference", "model", "Inference (host batch in/out)"),
)


def plot_results(doc: dict, path: Path) -> Path:
    """Draw ``doc`` (a results document) and write it to ``path`` as a PNG."""
    plt = _pyplot()
    fig = draw(doc)
    path = Path(path)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())  # a failed write leaves no half a PNG behind
    log.info("plot written to %s", path)
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DependencyError("matplotlib", "bench", "Drawing the benchmark plot") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def draw(doc: dict):
    """The figure of ``doc``: one panel per entry of ``_PANELS``, in that order."""
    plt = _pyplot()
    configs = list(doc["configs"])
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(6 * len(_PANELS), 5.2), squeeze=False)
    for ax, (stage, axis_key, title) in zip(axes[0], _PANELS):
        rows = [r for r in doc["results"] if r["stage"] == stage]
        groups = list(dict.fromkeys(r[axis_key] for r in rows))
        ax.set_title(title)
        if not rows:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        width = 0.8 / max(1, len(configs))
        for ci, c in enumerate(configs):
            xs, ys, lo, hi = [], [], [], []
            for gi, g in enumerate(groups):
                r = next((r for r in rows if r["config"] == c["id"] and r[axis_key] == g), None)
                if r is None:
                    continue
                s = r["images_per_s"]
                xs.append(gi - 0.4 + width * (ci + 0.5))
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            if not xs:
                continue
            bars = ax.bar(
                xs,
                ys,
                width * 0.95,
                yerr=[lo, hi],
                capsize=3,
                color=colours(ci % 10),
                hatch="//" if c["pipeline"] == "reference" else None,
                edgecolor="black",
                linewidth=0.5,
                label=c["id"],
            )
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)), groups)
        medians = [r["images_per_s"]["median"] for r in rows]
        log_scale = max(medians) / min(medians) > 10  # e.g. resnet18 next to caformer_s36 on a CPU
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel("images/s (median; whiskers min-max)" + (", log scale" if log_scale else ""))
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    machine = doc["machine"]
    device = machine["gpu"]["name"] if machine.get("gpu") else f"CPU: {machine['cpu']} ({machine['usable_cpus']} usable cores)"
    settings = doc["settings"]
    fig.suptitle(
        f"{device} - {doc['created_utc'][:10]} - {doc['images']['count']} images, batch {settings['batch_size']}, "
        f"{settings['repeats']} repeats x {settings['rounds']} rounds - RANDOM weights",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return fig
