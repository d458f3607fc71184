"""Plot legends sit beside the axes, never over the bars (issue 18, point 9)."""

import pytest

pytest.importorskip("matplotlib")


def stat(mean):
    return {"mean": mean, "std": 0.05, "per_run": [mean]}


def drawn_figure(draw, monkeypatch, *args):
    """Run a plotting function and keep the figure it would close."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert draw(*args)
    return figures[0]


def assert_legend_outside_every_axes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    assert legends, "the figure has a legend"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers an axes"


def test_specbench_summary_legend_is_outside_the_bars(tmp_path, monkeypatch):
    from kangaroo_lit.specbench.report import plot

    methods = ["vanilla", "kangaroo", "kangaroo_lookup", "pld", "generate", "hf_early_exit"]
    groups = ["writing", "roleplay", "qa", "math", "rag", "summarization"]
    results = {g: {m: {"speedup": stat(1.0 + 0.2 * j), "mat": stat(1.0 + 0.5 * j),
                       "accept_rate": stat(0.1 * j) if j else None} for j, m in enumerate(methods)}
               for g in groups}
    summary = {"groups": groups, "methods": methods, "results": results}
    fig = drawn_figure(plot, monkeypatch, summary, tmp_path / "summary.png")
    assert_legend_outside_every_axes(fig)
    assert (tmp_path / "summary.png").is_file()


def test_bench_decode_legend_is_outside_the_bars(tmp_path, monkeypatch):
    from kangaroo_lit.bench.decode import METHODS, speed_plot

    rows = [{"exit_layer": 1, "threshold": t, "tokens_per_s": {m: stat(10.0 + j) for j, m in enumerate(METHODS)}}
            for t in (0.3, 0.6)]
    report = {"rows": rows, "artifact": "runs/tiny/artifact", "model": None}
    fig = drawn_figure(speed_plot, monkeypatch, report, tmp_path / "speed.png")
    assert_legend_outside_every_axes(fig)
