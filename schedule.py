"""The paper's recipe as one value, PAPER, and its learning-rate and momentum schedules as pure
functions of the step that return floats.

PAPER holds the training's numbers: the stages (size, epochs, batch, LRs), one-cycle, optimizer,
LR range test and augmentation (the network's own, head dropout and Adam's betas, are model.py's).
train.py's flags of the same names default to it (machinery/config.py); --recipe fastai-v1 and
fastai-v2 are PAPER with a few fields replaced.

What it teaches: the recipe; fastai's one-cycle (v1's, step by step, and torch's OneCycleLR,
which is fastai v2's), the LR range test's sweep, and discriminative LRs, each as a formula
that needs no torch, so that a schedule can be printed, plotted or tested on its own
(tests/test_schedule.py). The loop that writes them into the optimizer is train.fit.

Vocabulary and defaults follow fastai v1 (1.0.x), which the paper used (FIDELITY.md):
    one_cycle(step, total, lr_max)        fastai v1's OneCycleScheduler, step by step
    one_cycle_torch(step, total, lr_max)  torch's OneCycleLR (fastai v2's defaults)
    lr_sweep(step)                        the exponential sweep of the LR range test
    discriminative_lrs(lr, n)             per-layer-group learning rates
    MaxLR.parse("1e-6:1e-4")              a phase's max LR as the flags write it, parsed once
"""
import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Stage:
    """One stage of progressive resizing: its image size, the epochs training the head alone
    (the body frozen), then the whole network, its batch size, and each phase's max LR as the
    flags write it (MaxLR, below: auto = the phase's LR range test picks it)."""
    size: int  # px
    frozen_epochs: int
    unfrozen_epochs: int
    batch_size: int
    lr_frozen: str = "auto"
    lr_unfrozen: str = "auto"


@dataclass(frozen=True)
class Recipe:
    """What a recipe chooses, as the paper ran it (Farooq & Hafeez 2020, with fastai v1)."""
    # Progressive resizing, 41 epochs: the network meets small films first. The last stage's
    # LRs are the paper's, spread across the layer groups (discriminative_lrs).
    stages: tuple = (Stage(128, frozen_epochs=3, unfrozen_epochs=5, batch_size=64),
                     Stage(224, frozen_epochs=3, unfrozen_epochs=5, batch_size=64),
                     Stage(229, frozen_epochs=0, unfrozen_epochs=25, batch_size=64,
                           lr_unfrozen="1e-6:1e-4"))
    # One cycle per phase (fit_one_cycle): from max LR / div up for pct_start of the steps,
    # then down to max LR / div_final (0: div x 1e4, fastai v1's); beta1 moves the other way.
    one_cycle: str = "v1"  # v1: fastai v1's OneCycleScheduler | torch: OneCycleLR (fastai v2's)
    pct_start: float = 0.3
    div: float = 25.0
    div_final: float = 0.0
    moms: tuple = (0.95, 0.85)
    # AdamW with decoupled weight decay; a fresh one at every phase, as the paper's script
    # calling fastai v1's freeze() and unfreeze() made one (train.start_phase)
    wd: float = 0.01
    opt_reset: str = "fresh"
    # Smith's LR range test (lrfind.py): 100 steps from 1e-7 to 10, the loss smoothed by an
    # EMA; read with fastai v2's valley, where v1's min_grad chose worse (FIDELITY.md, measured)
    lr_find_steps: int = 100
    lr_find_start: float = 1e-7
    lr_find_end: float = 10.0
    lr_find_beta: float = 0.98
    suggest: str = "valley"
    # fastai v1's get_transforms() (data.Augment): each transform with its own coin per film
    flip: bool = True  # left-right, p 0.5 (fastai v1's do_flip); --no-flip keeps the heart left
    rotate: float = 10.0  # degrees, either way
    zoom: float = 1.1  # up to 1.1x magnification, its centre drawn at random
    warp: float = 0.2  # symmetric_warp: four corner offsets, each uniform in +-warp
    lighting: float = 0.2  # brightness 0.5 +- 0.1, contrast log-uniform in (0.8, 1.25)
    p_affine: float = 0.75  # probability of each of warp, rotation and zoom, per film
    p_lighting: float = 0.75  # of each of brightness and contrast


PAPER = Recipe()
FASTAI_V1 = replace(PAPER, suggest="min_grad")  # fastai v1 to the letter: its LR reading too
FASTAI_V2 = replace(PAPER, one_cycle="torch", pct_start=0.25, div_final=1e5, opt_reset="moments",
                    suggest="valley")  # v2's own, whatever PAPER reads the curve with


def _cos(start, end, pct):
    # Half a cosine from start (pct 0) to end (pct 1); fastai's annealing_cos and torch's
    # OneCycleLR._annealing_cos are this same formula.
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _check(step, total):
    if total < 1:
        raise ValueError(f"a one-cycle schedule needs at least 1 step, got total={total}")
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside the schedule's 0..{total - 1}")


def one_cycle(step, total, lr_max, pct_start=PAPER.pct_start, div=PAPER.div,
              div_final=PAPER.div_final, moms=PAPER.moms):
    """(lr, momentum) for batch `step` (0-based) of `total`, as fastai v1's fit_one_cycle.

    fastai v1 (callbacks/one_cycle.py: OneCycleScheduler) runs two cosine schedules: a warm-up
    of n1 = int(total * pct_start) steps from lr_max/div to lr_max, then the other n2 steps
    down to lr_max/div_final (0: v1's final_div = div * 1e4, lr_max / 2.5e5). Each is a fastai
    Scheduler that moves on *after* a batch, so batch 0 trains at lr_max/div, batch n1 at
    lr_max, and the last batch one step short of the end. The momentum (Adam's beta1) moves
    the other way, moms[0] -> moms[1] -> back towards moms[0].
    """
    _check(step, total)
    div_final = div_final or div * 1e4
    n1 = max(1, int(total * pct_start))  # a fastai Scheduler has at least one step
    n2 = max(1, total - int(total * pct_start))
    if step <= n1:
        pct = step / n1
        return _cos(lr_max / div, lr_max, pct), _cos(moms[0], moms[1], pct)
    pct = (step - n1) / n2
    return _cos(lr_max, lr_max / div_final, pct), _cos(moms[1], moms[0], pct)


def one_cycle_torch(step, total, lr_max, pct_start=FASTAI_V2.pct_start, div=FASTAI_V2.div,
                    div_final=FASTAI_V2.div_final, moms=FASTAI_V2.moms + FASTAI_V2.moms[:1]):
    """(lr, momentum) at `step` (0-based) of torch's OneCycleLR: fastai v2's defaults.

    Equals OneCycleLR(max_lr=lr_max, total_steps=total, pct_start=pct_start, div_factor=div,
    final_div_factor=div_final/div, base_momentum=moms[1], max_momentum=moms[0],
    anneal_strategy="cos", three_phase=False) (torch's final_div_factor divides the *initial*
    LR, fastai's div_final the peak). fastai v2 (callback/schedule.py) uses the same curve as
    a function of step/total, which puts its peak and its end about one step later.
    """
    _check(step, total)
    if total < 2:
        return lr_max / div, moms[0]
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


ONE_CYCLE = {"v1": one_cycle, "torch": one_cycle_torch}  # --one-cycle


def lr_sweep(step, n_steps=PAPER.lr_find_steps, lr_start=PAPER.lr_find_start,
             lr_end=PAPER.lr_find_end):
    """LR at `step` of the exponential sweep of Smith's LR range test.

    fastai's LRFinder (v1 and v2 alike): lr_start * (lr_end/lr_start) ** (step/n_steps), equal
    steps in log(lr). The last step, n_steps - 1, stops one step short of lr_end.
    """
    if n_steps < 1:
        raise ValueError(f"the LR sweep needs at least 1 step, got {n_steps}")
    return lr_start * (lr_end / lr_start) ** (step / n_steps)


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


@dataclass(frozen=True)
class MaxLR:
    """A phase's max LR as --lr-frozen and --lr-unfrozen write it, parsed once (the flags'
    check and the plan both parse with this): auto (the LR range test's suggestion), x (one LR
    for every layer group), :x (fastai's slice(x): x/10 for the body's groups) or lo:hi (spread
    geometrically across the groups, discriminative_lrs)."""
    form: str  # "auto" | "x" | ":x" | "lo:hi"
    lo: float = 0.0  # lo:hi's lo
    hi: float = 0.0  # x, :x's x, lo:hi's hi

    @classmethod
    def parse(cls, spec):
        """'auto' | '1e-3' | ':1e-3' | '1e-6:1e-4' -> MaxLR; a ValueError for anything else
        (every LR a finite positive number, lo <= hi)."""
        if spec == "auto":
            return cls("auto")
        parts = [float(v) for v in spec.removeprefix(":").split(":")]
        if len(parts) > 2 or spec.startswith(":") and len(parts) > 1 or min(parts) <= 0 or \
                parts[0] > parts[-1] or not all(math.isfinite(v) for v in parts):
            raise ValueError(spec)
        form = ":x" if spec.startswith(":") else "lo:hi" if len(parts) == 2 else "x"
        return cls(form, parts[0], parts[-1])
