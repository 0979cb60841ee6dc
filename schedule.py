"""Learning-rate and momentum schedules, as pure functions of the step that return floats.

Nothing here needs torch: each function maps a step number to a number, so a schedule can be
printed, plotted or tested on its own. tests/test_schedule.py checks `one_cycle` against
torch.optim.lr_scheduler.OneCycleLR step for step.

Vocabulary and defaults follow fastai (callback/schedule.py), which the paper used:
    one_cycle(step, total, lr_max)   cosine warm-up to lr_max, then cosine annealing
    lr_sweep(step)                   the exponential sweep of the LR range test
    discriminative_lrs(lr, n)        per-layer-group learning rates
"""
import math


def _cos(start, end, pct):
    # Half a cosine from start (pct 0) to end (pct 1); the same formula as torch's
    # OneCycleLR._annealing_cos, so both agree to the last bit.
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def one_cycle(step, total, lr_max, pct_start=0.25, div=25.0, div_final=1e5,
              moms=(0.95, 0.85, 0.95)):
    """(lr, momentum) at `step` (0-based) of a one-cycle schedule of `total` steps.

    The LR rises from lr_max/div to lr_max over the first pct_start of the steps, then falls to
    lr_max/div_final; the momentum (Adam's beta1) moves the other way, moms[0] -> moms[1] ->
    moms[2]. Equals torch's OneCycleLR(max_lr=lr_max, total_steps=total, pct_start=pct_start,
    div_factor=div, final_div_factor=div_final/div, base_momentum=moms[1],
    max_momentum=moms[0], anneal_strategy="cos", three_phase=False). torch's final_div_factor
    divides the *initial* LR, fastai's div_final the peak: hence div_final/div.
    """
    if total < 2:
        raise ValueError(f"one_cycle needs at least 2 steps, got total={total}")
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside the schedule's 0..{total - 1}")
    # The peak is reached at step pct_start*total - 1, counted as torch counts it
    # (a float, possibly negative when the warm-up is shorter than one step).
    peak = float(pct_start * total) - 1
    if step <= peak:
        start, end, lrs, ms = 0.0, peak, (lr_max / div, lr_max), (moms[0], moms[1])
    else:
        start, end, lrs, ms = peak, total - 1, (lr_max, lr_max / div_final), (moms[1], moms[2])
    # A warm-up of zero length (peak == 0) has already ended at its only step:
    # torch divides 0 by 0 there; we take the phase's end.
    pct = (step - start) / (end - start) if end != start else 1.0
    return _cos(lrs[0], lrs[1], pct), _cos(ms[0], ms[1], pct)


def lr_sweep(step, n_steps=100, lr_start=1e-7, lr_end=10.0):
    """LR at `step` of the exponential sweep of Smith's LR range test.

    Geometric from lr_start (step 0) to lr_end (step n_steps - 1): equal steps in log(lr),
    which is how the finder's plot is read.
    """
    if n_steps < 2:
        raise ValueError(f"the LR sweep needs at least 2 steps, got {n_steps}")
    return lr_start * (lr_end / lr_start) ** (step / (n_steps - 1))


def discriminative_lrs(lr, n_groups):
    """One learning rate per layer group, lowest for the layers nearest the input.

    lr = (lo, hi): spread geometrically, lo for the first group and hi for the last
         (1e-6..1e-4 over 3 groups -> 1e-6, 1e-5, 1e-4, as the paper's last stage).
    lr = x:        fastai's slice(x): x/10 for every group but the last, which gets x.
    Pre-trained early layers hold generic edges and textures that need little change;
    the new head needs the most (Howard & Ruder, ULMFiT, 2018).
    """
    if n_groups < 1:
        raise ValueError(f"need at least one layer group, got {n_groups}")
    if isinstance(lr, (tuple, list)):
        lo, hi = lr
        if n_groups == 1:
            return [float(hi)]
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    return [lr / 10] * (n_groups - 1) + [float(lr)]
