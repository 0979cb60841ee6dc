"""The schedules: fastai v1's one-cycle as its callbacks step it, the torch/fastai-v2 one against
torch's own OneCycleLR, the LR sweep, and discriminative LRs."""
import math

import numpy as np
import pytest
import torch

from schedule import discriminative_lrs, lr_sweep, one_cycle, one_cycle_torch


class FastaiV1Scheduler:
    """fastai v1's callback.py: Scheduler, as its source has it: n_iter = max(1, n_iter), and
    each step() advances n first, then returns func(start, end, n / n_iter)."""

    def __init__(self, start, end, n_iter):
        self.start, self.end, self.n_iter, self.n = start, end, max(1, n_iter), 0

    def step(self):
        self.n += 1
        pct = self.n / self.n_iter
        return self.end + (self.start - self.end) / 2 * (np.cos(np.pi * pct) + 1)

    @property
    def is_done(self):
        return self.n >= self.n_iter


def fastai_v1_one_cycle(n, lr_max, pct_start=0.3, div=25.0, moms=(0.95, 0.85)):
    """(lr, mom) per batch as fastai v1's OneCycleScheduler sets them: on_train_begin sets the
    first schedules' start values; on_batch_end steps the current schedule and moves on to the
    next once it is done. Recorded at each batch's start, as fastai's Recorder does."""
    a1 = int(n * pct_start)
    a2 = n - a1
    final_div = div * 1e4
    lr_s = [FastaiV1Scheduler(lr_max / div, lr_max, a1),
            FastaiV1Scheduler(lr_max, lr_max / final_div, a2)]
    mom_s = [FastaiV1Scheduler(moms[0], moms[1], a1), FastaiV1Scheduler(moms[1], moms[0], a2)]
    lr, mom, idx, out = lr_s[0].start, mom_s[0].start, 0, []
    for _ in range(n):
        out.append((lr, mom))  # the batch trains at these
        lr, mom = lr_s[idx].step(), mom_s[idx].step()
        if lr_s[idx].is_done:
            idx += 1
            if idx == len(lr_s):
                break
    return out


@pytest.mark.parametrize("pct_start", [0.0, 0.1, 0.25, 0.3, 0.5, 0.77, 1.0])
def test_one_cycle_is_fastai_v1_step_by_step(pct_start):
    for total in list(range(1, 41)) + [97, 100, 135, 1000]:
        ref = fastai_v1_one_cycle(total, 3e-3, pct_start)
        assert len(ref) == total
        for step, (lr_f, mom_f) in enumerate(ref):
            lr, mom = one_cycle(step, total, 3e-3, pct_start, 25.0, 2.5e5)
            assert lr == pytest.approx(lr_f, rel=1e-12, abs=0), (total, step)
            assert mom == pytest.approx(mom_f, rel=1e-12, abs=0), (total, step)


def test_one_cycle_fastai_v1_values_by_hand():
    # 10 batches at pct_start 0.3: int(3.0000000000000004) = 3 warm-up steps, then 7
    lrs = [one_cycle(s, 10, 1.0)[0] for s in range(10)]
    assert lrs[0] == pytest.approx(1 / 25)  # batch 0: lr_max / div
    assert lrs[3] == pytest.approx(1.0)  # batch n1 = 3: the peak
    assert lrs[1] == pytest.approx(1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi / 3)) / 2)
    # the last batch is one step short of lr_max / 2.5e5: cos at 6/7 of the way down
    assert lrs[9] == pytest.approx(1 / 2.5e5 + (1 - 1 / 2.5e5) * (1 + math.cos(math.pi * 6 / 7))
                                   / 2)
    moms = [one_cycle(s, 10, 1.0)[1] for s in range(10)]
    assert moms[0] == pytest.approx(0.95) and moms[3] == pytest.approx(0.85) and moms[9] < 0.95
    # fewer warm-up steps than one: fastai's Scheduler still takes one (n_iter = max(1, 0))
    assert [one_cycle(s, 3, 1.0)[0] for s in range(2)] == pytest.approx([1 / 25, 1.0])


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
def test_one_cycle_torch_equals_torch(pct_start):
    moms = (0.95, 0.85, 0.95)
    for total in list(range(2, 41)) + [97, 100, 1000]:
        try:
            ref = torch_one_cycle(total, 3e-3, pct_start, 25.0, 1e5, moms)
        except ZeroDivisionError:  # torch divides 0 by 0 when the warm-up ends at step 0
            assert pct_start * total == 1
            continue
        for step, (lr_t, mom_t) in enumerate(ref):
            lr, mom = one_cycle_torch(step, total, 3e-3, pct_start, 25.0, 1e5, moms)
            assert lr == pytest.approx(lr_t, rel=1e-9, abs=0), (total, step)
            assert mom == pytest.approx(mom_t, rel=1e-9, abs=0), (total, step)


def test_one_cycle_torch_other_arguments_equal_torch():
    # torch ends the momentum where it started, so moms[2] == moms[0] for an equivalent call
    ref = torch_one_cycle(57, 0.1, 0.4, 10.0, 1e3, (0.9, 0.8, 0.9))
    ours = [one_cycle_torch(s, 57, 0.1, 0.4, 10.0, 1e3, (0.9, 0.8, 0.9)) for s in range(57)]
    for (lr_t, m_t), (lr, m) in zip(ref, ours):
        assert math.isclose(lr, lr_t, rel_tol=1e-9) and math.isclose(m, m_t, rel_tol=1e-9)
    # ... and where fastai's three momenta differ, the last one is where the cycle ends
    assert one_cycle_torch(56, 57, 0.1, moms=(0.9, 0.8, 0.99))[1] == pytest.approx(0.99)


def test_one_cycle_torch_shape_with_fastai_v2_defaults():
    total = 100
    lrs = [one_cycle_torch(s, total, 1e-3)[0] for s in range(total)]
    moms = [one_cycle_torch(s, total, 1e-3)[1] for s in range(total)]
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 24  # 25% warm-up
    assert lrs[-1] == pytest.approx(1e-3 / 1e5)
    assert moms[0] == pytest.approx(0.95) and moms[24] == pytest.approx(0.85)
    assert moms[-1] == pytest.approx(0.95)


def test_one_cycle_torch_zero_length_warmup_starts_at_peak():
    # 4 steps at pct_start 0.25: the peak falls on step 0 (torch raises ZeroDivisionError here)
    lr, mom = one_cycle_torch(0, 4, 1e-3)
    assert lr == pytest.approx(1e-3) and mom == pytest.approx(0.85)


def test_the_two_one_cycles_differ_by_about_a_step():
    # fastai v1 peaks at batch int(0.3 n), torch at 0.3 n - 1; both end near lr_max / div_final
    v1 = [one_cycle(s, 100, 1.0, 0.3)[0] for s in range(100)]
    tv = [one_cycle_torch(s, 100, 1.0, 0.3)[0] for s in range(100)]
    assert v1.index(max(v1)) == 30 and tv.index(max(tv)) == 29
    assert max(abs(a - b) for a, b in zip(v1, tv)) < 0.06


def test_one_cycles_reject_bad_steps():
    for f in (one_cycle, one_cycle_torch):
        with pytest.raises(ValueError):
            f(5, 5, 1e-3)
        with pytest.raises(ValueError):
            f(0, 0, 1e-3)


def test_lr_sweep_is_fastai_lr_finder():
    # fastai v1 (callbacks/lr_finder.py) and v2: batch i at start * (end/start) ** (i/num_it)
    lrs = [lr_sweep(i) for i in range(100)]
    assert lrs[0] == 1e-7
    assert lrs[50] == pytest.approx(1e-7 * 1e8 ** 0.5)
    assert lrs[-1] == pytest.approx(1e-7 * 1e8 ** 0.99)  # one step short of 10
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # equal steps in log(lr)
    assert lr_sweep(1, 2, 1e-4, 1e-2) == pytest.approx(1e-3)


def test_discriminative_lrs():
    assert discriminative_lrs((1e-6, 1e-4), 3) == pytest.approx([1e-6, 1e-5, 1e-4])
    assert discriminative_lrs((1e-5, 1e-2), 4) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert discriminative_lrs(1e-3, 3) == pytest.approx([1e-4, 1e-4, 1e-3])  # fastai slice(x)
    assert discriminative_lrs(1e-3, 1) == [1e-3]
    assert discriminative_lrs((1e-6, 1e-4), 1) == [1e-4]


def test_lr_forms_are_parsed_once_into_values():
    from schedule import MaxLR
    assert MaxLR.parse("auto") == MaxLR("auto")
    assert MaxLR.parse("3e-3") == MaxLR("x", 3e-3, 3e-3)
    assert MaxLR.parse(":1e-3") == MaxLR(":x", 1e-3, 1e-3)
    assert MaxLR.parse("1e-6:1e-4") == MaxLR("lo:hi", 1e-6, 1e-4)
    for bad in ["fast", "1e-4:1e-6", "0", "-1e-3", ":1e-4:1e-3", "1e-3:", "nan", "1:2:3"]:
        with pytest.raises(ValueError):
            MaxLR.parse(bad)
