"""LR finder: suggestions on curves with a known answer, early stop, and exact restoration."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lrfind import lr_find, minimum, save_lr_find, steep, valley
from schedule import lr_sweep

LRS = [lr_sweep(i, 81, 1e-7, 1e1) for i in range(81)]  # ten points per decade


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


def test_suggestions_ignore_non_finite_tail():
    losses = [(math.log10(lr) + 3) ** 2 for lr in LRS[:60]] + [math.nan]
    assert minimum(LRS[:61], losses) == pytest.approx(1e-4, rel=1e-6)
    assert math.isfinite(valley(LRS[:61], losses))


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
