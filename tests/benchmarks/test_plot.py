"""The benchmark plot: what each panel shows, its scale, and the command that draws it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from engine.errors import DependencyError
from tests.benchmarks.docs import DEFAULT_FIGURES, ENGINE, REFERENCE, make_doc

pytest.importorskip("matplotlib")

from benchmarks.plot import draw, plot_results  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def _bars(ax) -> list[tuple[str, float, float, float, str | None]]:
    """(config, median, whisker low, whisker high, hatch) of each bar, in drawing order."""
    from matplotlib.container import BarContainer

    out = []
    for container in [c for c in ax.containers if isinstance(c, BarContainer)]:
        (_, _, (segments,)) = container.errorbar.lines
        for bar, seg in zip(container.patches, segments.get_segments()):
            (_, low), (_, high) = seg
            out.append((container.get_label(), bar.get_height(), low, high, bar.get_hatch()))
    return out


def test_each_panel_shows_every_configuration_with_its_median_and_spread(close_figures):
    doc = make_doc()
    fig = draw(doc)
    panels = fig.axes[:3]
    assert [ax.get_title() for ax in panels] == ["End to end (files -> labels)", "Decode + preprocess",
                                                "Inference (host batch in/out)"]
    for ax, stage in zip(panels, ("end_to_end", "preprocess", "inference")):
        want = []
        for config in (ENGINE, REFERENCE):
            (r,) = [r for r in doc["results"] if r["stage"] == stage and r["config"] == config]
            s = r["images_per_s"]
            want.append((config, s["median"], s["min"], s["max"], "//" if config == REFERENCE else None))
        got = _bars(ax)
        assert [g[0] for g in got] == [w[0] for w in want] and [g[4] for g in got] == [w[4] for w in want]
        np.testing.assert_allclose([g[1:4] for g in got], [w[1:4] for w in want], rtol=1e-9)
        left, right = sorted(ax.patches, key=lambda b: b.get_x())  # side by side around the group's tick
        assert left.get_x() + left.get_width() <= right.get_x()
        assert (left.get_x() + right.get_x() + right.get_width()) / 2 == pytest.approx(ax.get_xticks()[0])
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == (["gender/alpha"] if stage == "inference" else ["gender"])
    title = fig._suptitle.get_text()
    assert title.startswith("CPU: Test CPU (2 usable cores) - 2026-01-01 - ") and title.endswith("RANDOM weights")


def test_a_panel_spanning_more_than_ten_times_is_drawn_on_a_log_scale(close_figures):
    figures = dict(DEFAULT_FIGURES)
    figures[(REFERENCE, "inference", None, "gender/alpha")] = 5.0  # 60 vs 5: x12
    figures[(REFERENCE, "end_to_end", "gender", None)] = 4.0  # 40 vs 4: exactly x10, linear
    end_to_end, _, inference = draw(make_doc(figures)).axes[:3]
    assert inference.get_yscale() == "log" and "log scale" in inference.get_ylabel()
    assert end_to_end.get_yscale() == "linear" and "log scale" not in end_to_end.get_ylabel()


def test_a_stage_that_was_not_measured_says_so(close_figures):
    figures = {k: v for k, v in DEFAULT_FIGURES.items() if k[1] != "preprocess"}
    _, preprocess, inference = draw(make_doc(figures)).axes[:3]
    assert [t.get_text() for t in preprocess.texts] == ["not measured"] and not preprocess.containers
    assert len(_bars(inference)) == 2


def test_plot_command_writes_the_png_next_to_the_results(tmp_path, capsys):
    from benchmarks.__main__ import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps(make_doc()))
    assert main(["plot", str(results)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'results.png'}"
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1980, 572)  # 18 x 5.2 inches at 110 dpi


def test_without_matplotlib_the_plot_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(DependencyError, match=r"'matplotlib'.*anime-batch-engine\[bench\]"):
        plot_results(make_doc(), tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
