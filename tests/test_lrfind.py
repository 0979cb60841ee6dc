"""LR finder: suggestions on curves with a known answer, early stop, and exact restoration."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lrfind import lr_find, min_grad, minimum, save_lr_find, steep, title_of, valley
from schedule import lr_sweep

LRS = [lr_sweep(i, 80, 1e-7, 1e1) for i in range(81)]  # ten points per decade, 1e-7..1e1


def at(lr):
    return min(range(len(LRS)), key=lambda i: abs(math.log10(LRS[i] / lr)))


def test_minimum_is_a_tenth_of_the_lowest_loss():
    losses = [(math.log10(lr) + 3) ** 2 for lr in LRS]  # lowest at 1e-3
    assert minimum(LRS, losses) == pytest.approx(1e-4, rel=1e-6)


def test_steep_finds_the_fastest_fall():
    losses = [-math.tanh(2 * (math.log10(lr) + 4)) for lr in LRS]  # steepest at 1e-4
    assert steep(LRS, losses) == pytest.approx(1e-4, rel=0.3)


def test_valley_picks_inside_the_longest_fall():
    # Falls from index 8 (the first tenth is trimmed) to index 68 = 1e-1, then rises
    losses = [abs(i - 68) / 10 + (1.0 if i < 8 else 0) for i in range(81)]
    lr = valley(LRS, losses)
    i = LRS.index(lr)
    # run of 61 points ending at trimmed index 60: start -1, picks -1 + 20 + 10 = 29 -> 8 + 29
    assert i == 37
    assert LRS[8] < lr < LRS[68]


def test_valley_skips_a_tenth_of_the_planned_sweep():
    # fastai v2 trims num_it // 10 of the sweep it planned, also when it stopped early: a fall
    # over points 6..9 of a 60-point curve counts for 60 planned steps but not for 100
    losses = [5.0] * 6 + [4.0, 3.0, 2.0, 1.0] + [1.0 + 0.01 * i for i in range(50)]
    assert LRS.index(valley(LRS[:60], losses, 60)) in range(6, 10)
    assert LRS.index(valley(LRS[:60], losses, 100)) >= 10


def test_suggestions_ignore_non_finite_tail():
    losses = [(math.log10(lr) + 3) ** 2 for lr in LRS[:60]] + [math.nan]
    assert minimum(LRS[:61], losses) == pytest.approx(1e-4, rel=1e-6)
    assert math.isfinite(valley(LRS[:61], losses))
    assert math.isfinite(min_grad(LRS[:61], losses))


def test_min_grad_is_fastai_v1s_steepest_central_difference():
    losses = [-math.tanh(2 * (math.log10(lr) + 4)) for lr in LRS]  # steepest at 1e-4
    assert min_grad(LRS, losses) == LRS[at(1e-4)]
    # central differences, not forward ones: two falls of 0.3 in a row beat one of 0.35
    losses = [3.0] * 30 + [2.7, 2.4] + [2.4] * 20 + [2.05] * 29
    assert len(losses) == 81
    assert min_grad(LRS, losses) == LRS[30]  # (2.4 - 3.0) / 2 at point 30
    assert steep(LRS, losses) == LRS[51]  # forward differences: the single 0.35 fall


def test_min_grad_skips_the_first_10_and_last_5_points_and_takes_the_first_tie():
    # steep falls in the first 10 and the last 5 points, which are not seen; in between a
    # steady fall of exactly 0.5 per point, all ties: the first point kept, 10, is taken
    losses = [100.0, 50.0] + [40 - 0.5 * i for i in range(74)] + [-500.0] * 5
    assert len(losses) == 81 and min_grad(LRS, losses) == LRS[10]
    flat = [2.0] * 40 + [1.0, 0.0, -1.0] + [-1.0] * 38  # points 40 and 41 tie at -1
    assert min_grad(LRS, flat) == LRS[40]


def test_min_grad_on_short_sweeps():
    # fastai v1 gives no suggestion when fewer than 2 points survive the trim; we take the
    # steepest point of the whole finite curve instead
    short = [3.0, 2.9, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1]  # 12 points
    assert min_grad(LRS[:12], short) == LRS[1]  # (2.0 - 3.0) / 2 at point 1
    seventeen = [1.0] * 10 + [0.5, 0.4] + [9.0] * 5  # exactly two points survive: 10, 11
    assert min_grad(LRS[:17], seventeen) == LRS[10]  # np.gradient of 2 points: a tie
    with pytest.raises(ValueError, match="no finite loss"):
        min_grad(LRS[:3], [math.nan] * 3)


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))) for _ in range(5)]

    def step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    for x, y in data[:3]:  # give the optimizer some state of its own first
        step(x, y)
    return model, opt, data, step


def snapshot(model, opt):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    st = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
          for i, s in enumerate(opt.state.values())}
    return sd, st, [dict(g, params=None) for g in opt.param_groups]


def assert_same(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for i in a[1]:
        for k in a[1][i]:
            assert torch.equal(torch.as_tensor(a[1][i][k]), torch.as_tensor(b[1][i][k]))
    assert a[2] == b[2]


def test_lr_find_restores_model_and_optimizer_bit_for_bit():
    model, opt, data, step = tiny_setup()
    before = snapshot(model, opt)
    lrs, raw, smooth = lr_find(step, model, opt, data, n_steps=20, lr_start=1e-4, lr_end=1.0)
    assert len(lrs) >= 5 and lrs[0] == pytest.approx(1e-4)
    assert_same(before, snapshot(model, opt))
    # the parameters are still the optimizer's: a step after the finder changes them
    step(*data[0])
    assert not torch.equal(before[0]["5.weight"], model.state_dict()["5.weight"])


def test_lr_find_restores_state_when_interrupted():
    model, opt, data, step = tiny_setup()
    before = snapshot(model, opt)
    calls = []

    def failing_step(x, y):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(x, y)
    with pytest.raises(KeyboardInterrupt):
        lr_find(failing_step, model, opt, data, n_steps=20)
    assert_same(before, snapshot(model, opt))


def test_lr_find_stops_when_loss_explodes():
    model, opt, data, _ = tiny_setup()
    losses = iter([1.0] * 10 + [2.0, 5.0, 50.0, 500.0, float("nan")] + [1.0] * 100)
    lrs, raw, smooth = lr_find(lambda x, y: torch.tensor(next(losses)), model, opt, data,
                               n_steps=100)
    assert len(lrs) < 20  # stopped once the smoothed loss passed 4x its best
    assert smooth[-1] > 4 * min(smooth) or not math.isfinite(smooth[-1])
    # the smoothing is the debiased EMA: the first value is the first loss itself
    assert smooth[0] == pytest.approx(1.0)


def test_save_lr_find_writes_csv_and_png(tmp_path):
    losses = [(math.log10(lr) + 3) ** 2 + 1 for lr in LRS]
    prefix = str(tmp_path / "lrfind")
    lr = save_lr_find(prefix, LRS, losses, losses, "minimum")
    assert lr == pytest.approx(1e-4, rel=1e-6)
    rows = open(prefix + ".csv").read().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss" and len(rows) == 82
    from PIL import Image
    img = Image.open(prefix + ".png")
    assert img.size == (800, 500)
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # something was drawn
    # an unfrozen phase's sweep also marks the body's LR (lr / 10): a second red circle
    save_lr_find(prefix + "_body", LRS, losses, losses, "minimum", body_div=10)
    red = lambda p: (np.abs(np.asarray(Image.open(p).convert("RGB")).astype(int) -
                            (214, 39, 40)).sum(2) < 60).sum()
    assert red(prefix + "_body.png") > 1.5 * red(prefix + ".png")


def fastai_v2_valley_index(losses):
    """fastai v2's valley (callback/schedule.py), as its source has it: max_start is noted
    inside the inner loop, from a run length that the same loop may still raise."""
    n = len(losses)
    max_start, max_end, lds = 0, 0, [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def test_valley_is_fastai_v2s_on_random_curves():
    rng = np.random.default_rng(0)
    lrs = [lr_sweep(i, 100) for i in range(100)]
    for _ in range(300):
        losses = list(np.cumsum(rng.normal(0, 1, 100)))  # random walks: many valleys
        trimmed = losses[10:95]  # fastai v2 trims num_it // 10 and the last 5
        assert valley(lrs, losses, 100) == lrs[10 + fastai_v2_valley_index(trimmed)]


def test_lr_find_smooths_with_fastais_debiased_average():
    # callback.py: SmoothenValue: avg = beta * avg + (1 - beta) * loss; smooth = avg / (1 - beta^n)
    model, opt, data, _ = tiny_setup()
    losses = [2.0, 1.0, 3.0, 0.5, 1.5]
    it = iter(losses)
    _, raw, smooth = lr_find(lambda x, y: torch.tensor(next(it)), model, opt, data, n_steps=5)
    avg, expect = 0.0, []
    for n, loss in enumerate(losses, 1):
        avg = 0.98 * avg + 0.02 * loss
        expect.append(avg / (1 - 0.98 ** n))
    assert raw == losses and smooth == pytest.approx(expect, rel=1e-12)
    assert smooth[1] == pytest.approx((0.98 * 0.02 * 2 + 0.02 * 1) / (1 - 0.98 ** 2))


def test_lr_finder_plots_are_titled_in_words():
    assert title_of("lrfind_s2_224_unfrozen") == "LR range test: stage 2, 224 px, all layers"
    assert title_of("lrfind_32_frozen") == "LR range test: 32 px, head only (body frozen)"


def test_reading_each_loss_late_changes_nothing(monkeypatch):
    # the sweep reads each loss a few steps late (the device never waits): the curve, where it
    # stops, the state restored and dropout's generator after it are those of reading at once
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(5)]

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()
    out = {}
    for lag in (0, 3):
        torch.manual_seed(1)
        curve = lr_find(step, model, opt, data, n_steps=60, lr_start=1e-3, lr_end=1e4, lag=lag)
        out[lag] = curve, torch.get_rng_state(), model.state_dict()
    assert len(out[0][0][0]) < 60  # it diverged and stopped early
    assert out[0][0] == out[3][0] and torch.equal(out[0][1], out[3][1])
    assert all(torch.equal(v, out[3][2][k]) for k, v in out[0][2].items())
