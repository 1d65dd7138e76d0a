"""The pipelines' figures and tables say what they show: a single fusion is not titled as a
comparison, weights are drawn on their whole range 0-1, and cells over seeds carry their intervals."""

import pytest
from PIL import Image

from common import report
from common.study import t_interval


def result(epe: float) -> dict:
    return {"metrics": {"0.0": {"mean_epe_mm": epe}, "0.5": {"mean_epe_mm": epe + 2}},
            "alpha": {"0.0": {"rgb": 0.6, "points": 0.4}, "0.5": {"rgb": 0.5, "points": 0.5}},
            "credibility": {"rgb": {"auroc": 0.75}, "points": {"auroc": None}},
            "credibility_samples": {"rgb": {"weight": [0.7, 0.6, 0.3, 0.2], "corrupted": [False, False, True, True]},
                                    "points": {"weight": [0.5] * 4, "corrupted": [False, True, False, True]}}}


@pytest.fixture
def plotted(monkeypatch):
    """The arguments of every line_plot call."""
    calls = []
    monkeypatch.setattr(report, "line_plot", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def test_a_single_fusion_is_not_titled_as_a_comparison(plotted, tmp_path):
    assert report.fusions_title("Pose from RGB", ["gpoe"]) == "Pose from RGB: gPoE"
    assert report.fusions_title("Pose from RGB", ["moe", "poe", "gpoe"]) == "Pose from RGB: MoE vs PoE vs gPoE"
    assert report.fusions_title("Pose from RGB", ["gpoe"], seeds=3).endswith("mean and 95 % CI over 3 seeds")
    report.corruption_plot({"gpoe": result(40.0)}, "mean_epe_mm", tmp_path / "a.png", "EPE", "Pose from RGB")
    (x, series, _, _, _, title), kwargs = plotted[-1]
    assert title == "Pose from RGB: gPoE" and list(series) == ["gPoE"] and x == [0.0, 50.0]


def test_over_seeds_the_plot_has_error_bars_and_the_table_intervals(plotted, tmp_path):
    results = {"poe": result(41.0), "gpoe": result(40.0)}
    statistics = {"seeds": [0, 1, 2], "metrics": {f: {lv: {"mean_epe_mm": t_interval([39.0, 40.0, 41.0])}
                                                       for lv in ("0.0", "0.5")} for f in results}}
    report.corruption_plot(results, "mean_epe_mm", tmp_path / "a.png", "EPE", "Pose from RGB", statistics=statistics)
    (_, series, *_), kwargs = plotted[-1]
    half = t_interval([39.0, 40.0, 41.0])["half_width"]
    assert series == {"PoE": [40.0, 40.0], "gPoE": [40.0, 40.0]} and kwargs["errors"]["gPoE"] == [half, half]
    table = report.fusion_table(results, [("EPE", "mean_epe_mm")], floatfmt=".2f", statistics=statistics)
    assert f"| gPoE | 40.00 ± {half:.2f} | 40.00 ± {half:.2f} |" in table
    assert "| gPoE | 40.00 | 42.00 |" in report.fusion_table(results, [("EPE", "mean_epe_mm")], floatfmt=".2f")


def test_alpha_is_plotted_on_its_whole_range(plotted, tmp_path):
    report.alpha_plots({"poe": {**result(41.0), "alpha": None}, "gpoe": result(40.0)}, tmp_path)
    assert len(plotted) == 1 and plotted[0][1]["ylim"] == (0.0, 1.0)


def test_credibility_figure_and_colour_key_are_drawn(tmp_path):
    report.credibility_plots({"gpoe": result(40.0), "moe": {**result(40.0), "credibility_samples": None}}, tmp_path)
    assert (tmp_path / "credibility_gpoe.png").stat().st_size > 0 and not (tmp_path / "credibility_moe.png").exists()
    images = [[[[0, 0, 0]] * 4] * 4] * 2
    report.image_grid([images], tmp_path / "plain.png")
    report.image_grid([images], tmp_path / "keyed.png", legend={"ground truth": (0, 0, 0), "gPoE": (40, 80, 230)})
    plain, keyed = (Image.open(tmp_path / name).size for name in ("plain.png", "keyed.png"))
    assert keyed[0] == plain[0] and keyed[1] > plain[1]  # the key gets a strip of its own below the grid


def test_joint_inference_tables_and_plots_show_each_group_at_its_own_levels(plotted, tmp_path):
    def joint(epe: float) -> dict:
        aux = {"0.0": {"mean_epe_mm": epe + 5}, "1.0": {"mean_epe_mm": epe + 9}}
        return {**result(epe), "metrics_joint": {"0.0": {"mean_epe_mm": epe - 4}, "0.5": {"mean_epe_mm": epe - 1}},
                "metrics_oracle": {"0.0": {"mean_epe_mm": epe - 4}, "0.5": {"mean_epe_mm": epe + 5}},
                "metrics_aux": aux, "metrics_joint_aux_corrupted": {"0.0": {"mean_epe_mm": epe - 4},
                                                                "1.0": {"mean_epe_mm": epe + 1}},
                "metrics_oracle_aux_corrupted": {"0.0": {"mean_epe_mm": epe - 4}, "1.0": {"mean_epe_mm": epe}}}

    results = {"poe": joint(41.0), "gpoe": joint(40.0)}
    markdown = report.joint_markdown(results, None, [("EPE", "mean_epe_mm")], ".2f")
    assert "| Fusion | EPE @ 0% | EPE @ 50% |" in markdown and "| Fusion | EPE @ σ 0 | EPE @ σ 1 |" in markdown
    assert "| gPoE, joint | 36.00 | 39.00 |" in markdown and "| PoE, points alone | 46.00 | 50.00 |" in markdown
    assert markdown.index("| PoE, joint |") < markdown.index("| gPoE, joint |") < markdown.index("| PoE, oracle |")
    report.joint_plots(results, "mean_epe_mm", tmp_path, "EPE")
    (x_rgb, series_rgb, _, xlabel_rgb, *_), styles_rgb = plotted[0][0], plotted[0][1]["styles"]
    (x_points, series_points, _, xlabel_points, *_), _ = plotted[1]
    assert x_rgb == [0.0, 50.0] and xlabel_rgb == "test pixel corruption (%)"
    assert x_points == [0.0, 1.0] and xlabel_points.startswith("test noise of the points")
    assert series_rgb["gPoE, oracle"] == [36.0, 45.0] and series_points["PoE, points alone"] == [46.0, 50.0]
    # A fusion keeps its colour, a prediction its line style.
    colour = {name: style["color"] for name, style in styles_rgb.items()}
    assert colour["gPoE, joint"] == colour["gPoE, oracle"] != colour["PoE, joint"]
    assert styles_rgb["gPoE, joint"]["linestyle"] != styles_rgb["gPoE, oracle"]["linestyle"]
