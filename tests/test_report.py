"""report.md's pieces: the bands of stages and phases, the most-confused pairs, a log axis."""
import numpy as np
import pytest
from PIL import Image

from machinery.plots import line_plot
from machinery.report import most_confused, phase_bands


def test_phase_bands_follow_the_epochs_of_each_phase():
    rows = [{"stage": 0, "phase_name": "frozen"}] + [{"stage": 0, "phase_name": "unfrozen"}] * 2 \
        + [{"stage": 1, "phase_name": "unfrozen"}] * 3
    assert phase_bands(rows) == [(0.5, 1.5, "s1 head"), (1.5, 3.5, "s1 all"),
                                 (3.5, 6.5, "s2 all")]


def test_most_confused_lists_the_largest_mistakes_first():
    cm = [[5, 2, 0], [7, 10, 1], [0, 0, 4]]
    assert most_confused(cm, ["a", "b", "c"], top=2) == [
        "Most confused (true -> predicted: films, share of the true class):", "",
        "- b -> a: 7 (39%)", "- a -> b: 2 (29%)", ""]
    assert most_confused([[3, 0], [0, 2]], ["a", "b"])[0].startswith("No test film")


def test_a_log_axis_keeps_a_spike_from_flattening_the_rest(tmp_path):
    ys = [2.0, 80.0, 1.0, 0.9, 0.5, 0.4]
    line_plot(tmp_path / "lin.png", [(range(1, 7), ys, "loss")], "epoch", "loss")
    line_plot(tmp_path / "log.png", [(range(1, 7), ys, "loss")], "epoch", "loss", logy=True,
              bands=[(0.5, 3.5, "s1"), (3.5, 6.5, "s2")])

    def height_of_the_tail(name):  # rows the line spans over its last three epochs
        a = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        blue = (abs(a[..., 0] - 31) < 30) & (abs(a[..., 2] - 180) < 30)
        cols = blue[75:440, 80 + (800 - 100) * 3 // 5:780]  # below the legend, in the frame
        rows = np.nonzero(cols.any(1))[0]
        return rows.max() - rows.min()
    assert height_of_the_tail("log.png") > 3 * height_of_the_tail("lin.png")
    shaded = np.asarray(Image.open(tmp_path / "log.png").convert("RGB"))[300, 100]
    assert tuple(shaded) == (240, 240, 248)  # the first band, shaded


def test_the_schedule_plots_draw_each_phase_from_its_max_lrs(tmp_path):
    from machinery.report import schedule_plots
    rows = [{"phase": "s1_32_frozen", "max_lrs": [1e-3, 1e-3, 1e-2]},
            {"phase": "s1_32_unfrozen", "max_lrs": [1e-4, 1e-4, 1e-3]},
            {"phase": "s1_32_unfrozen", "max_lrs": [1e-4, 1e-4, 1e-3]}]
    cfg = {"one_cycle": "v1", "pct_start": 0.3, "div": 25.0, "div_final": 2.5e5}
    xs, series, moms = schedule_plots(str(tmp_path), rows, cfg, phase_bands(
        [{"stage": 0, "phase_name": "frozen"}, {"stage": 0, "phase_name": "unfrozen"},
         {"stage": 0, "phase_name": "unfrozen"}]))
    assert [label for *_, label in series] == ["stem-layer2 and layer3-layer4", "head"]
    body, head = (np.array(ys) for _, ys, _ in series)
    xs, moms = np.array(xs), np.array(moms)
    first, rest = xs < 1.5, xs >= 1.5  # the frozen phase's epoch, then the unfrozen phase's two
    for lrs, peaks in [(body, (1e-3, 1e-4)), (head, (1e-2, 1e-3))]:
        for part, peak in zip((first, rest), peaks):  # each phase its own one-cycle:
            lr = lrs[part]
            assert lr.max() == pytest.approx(peak, rel=0.01)  # up to its max LR,
            assert lr[0] == pytest.approx(peak / 25) and lr[-1] < peak / 100  # from / 25, to
            top = np.argmax(lr) / len(lr)  # near / 1e4 (the last point drawn is a step short),
            assert 0.25 < top < 0.35  # the peak at pct_start 0.3
    assert moms.min() == pytest.approx(0.85, abs=1e-3) and moms.max() == pytest.approx(0.95)
    for name in ("lr_schedule.png", "momentum.png"):
        img = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        assert img.shape == (500, 800, 3) and (img.std(2) > 40).sum() > 500  # coloured lines
