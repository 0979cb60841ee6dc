"""The schedules against torch's own implementation and the values fastai users know."""
import math

import pytest
import torch

from schedule import discriminative_lrs, lr_sweep, one_cycle


def torch_one_cycle(total, lr_max, pct_start, div, div_final, moms):
    """(lr, beta1) per step from torch.optim.lr_scheduler.OneCycleLR on a real AdamW."""
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr_max)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr_max, total_steps=total, pct_start=pct_start, div_factor=div,
        final_div_factor=div_final / div, base_momentum=moms[1], max_momentum=moms[0],
        anneal_strategy="cos", three_phase=False, cycle_momentum=True)
    out = []
    for step in range(total):
        g = opt.param_groups[0]
        out.append((g["lr"], g["betas"][0]))
        if step < total - 1:
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize("pct_start", [0.0, 0.1, 0.25, 0.3, 0.5, 0.77, 1.0])
def test_one_cycle_equals_torch(pct_start):
    moms = (0.95, 0.85, 0.95)
    for total in list(range(2, 41)) + [97, 100, 1000]:
        try:
            ref = torch_one_cycle(total, 3e-3, pct_start, 25.0, 1e5, moms)
        except ZeroDivisionError:  # torch divides 0 by 0 when the warm-up ends at step 0
            assert pct_start * total == 1
            continue
        for step, (lr_t, mom_t) in enumerate(ref):
            lr, mom = one_cycle(step, total, 3e-3, pct_start, 25.0, 1e5, moms)
            assert lr == pytest.approx(lr_t, rel=1e-9, abs=0), (total, step)
            assert mom == pytest.approx(mom_t, rel=1e-9, abs=0), (total, step)


def test_one_cycle_other_arguments_equal_torch():
    # torch ends the momentum where it started, so moms[2] == moms[0] for an equivalent call
    ref = torch_one_cycle(57, 0.1, 0.4, 10.0, 1e3, (0.9, 0.8, 0.9))
    ours = [one_cycle(s, 57, 0.1, 0.4, 10.0, 1e3, (0.9, 0.8, 0.9)) for s in range(57)]
    for (lr_t, m_t), (lr, m) in zip(ref, ours):
        assert math.isclose(lr, lr_t, rel_tol=1e-9) and math.isclose(m, m_t, rel_tol=1e-9)
    # ... and where fastai's three momenta differ, the last one is where the cycle ends
    assert one_cycle(56, 57, 0.1, moms=(0.9, 0.8, 0.99))[1] == pytest.approx(0.99)


def test_one_cycle_shape_with_fastai_defaults():
    total = 100
    lrs = [one_cycle(s, total, 1e-3)[0] for s in range(total)]
    moms = [one_cycle(s, total, 1e-3)[1] for s in range(total)]
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 24  # 25% warm-up
    assert lrs[-1] == pytest.approx(1e-3 / 1e5)
    assert moms[0] == pytest.approx(0.95) and moms[24] == pytest.approx(0.85)
    assert moms[-1] == pytest.approx(0.95)


def test_one_cycle_zero_length_warmup_starts_at_peak():
    # 4 steps at pct_start 0.25: the peak falls on step 0 (torch raises ZeroDivisionError here)
    lr, mom = one_cycle(0, 4, 1e-3)
    assert lr == pytest.approx(1e-3) and mom == pytest.approx(0.85)


def test_one_cycle_rejects_bad_steps():
    with pytest.raises(ValueError):
        one_cycle(5, 5, 1e-3)
    with pytest.raises(ValueError):
        one_cycle(0, 1, 1e-3)


def test_lr_sweep_endpoints_and_geometric():
    lrs = [lr_sweep(i) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # equal steps in log(lr)
    assert lr_sweep(2, 3, 1e-4, 1e-2) == pytest.approx(1e-2)
    assert lr_sweep(1, 3, 1e-4, 1e-2) == pytest.approx(1e-3)


def test_discriminative_lrs():
    assert discriminative_lrs((1e-6, 1e-4), 3) == pytest.approx([1e-6, 1e-5, 1e-4])
    assert discriminative_lrs((1e-5, 1e-2), 4) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert discriminative_lrs(1e-3, 3) == pytest.approx([1e-4, 1e-4, 1e-3])  # fastai slice(x)
    assert discriminative_lrs(1e-3, 1) == [1e-3]
    assert discriminative_lrs((1e-6, 1e-4), 1) == [1e-4]
