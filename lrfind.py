"""Leslie Smith's LR range test (Smith, "Cyclical Learning Rates", 2017), as fastai's lr_find.

Train for a few steps while the learning rate grows exponentially, watch the loss, and read a
good learning rate off the curve; then put the model and optimizer back exactly as they were.
The reading: `min_grad` (fastai v1's, the paper's), or `valley` (fastai v2's, our default: on
flat, noisy curves min_grad lands in the noise at the low end; FIDELITY.md has the numbers).

    python lrfind.py --data PATH --size 128              # head only (the body frozen)
    python lrfind.py --data phantom --size 64 --phase unfrozen --weights none

From Python: lrs, raw, smooth = lr_find(step, model, opt, batches); valley(lrs, smooth).
"""
import copy
import csv
import math
import os

import numpy as np
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import data
import ddp
from config import parse_args
from plots import COLOURS, LIGHT, line_plot
from runner import freeze, setup, stage_tensors, train_batches
from schedule import lr_sweep


def lr_find(step, model, opt, batches, n_steps=100, lr_start=1e-7, lr_end=10.0, beta=0.98,
            stop_div=4.0):
    """Sweep the LR; return (lrs, raw losses, smoothed losses), one entry per step taken.

    step(x, y) runs forward, backward and the optimizer step and returns the loss tensor.
    Stops once the smoothed loss exceeds stop_div times its best or is not finite. The model
    and optimizer state are restored afterwards, bit for bit, also when the sweep is interrupted.
    """
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    lrs, raw, smooth = [], [], []
    avg, best = 0.0, math.inf
    try:
        it = iter(batches)
        for i in tqdm(range(n_steps), desc="lr_find", leave=False, disable=not ddp.main()):
            lr = lr_sweep(i, n_steps, lr_start, lr_end)
            for g in opt.param_groups:  # one LR for every layer group during the sweep
                g["lr"] = lr
            try:
                x, y = next(it)
            except StopIteration:  # small data sets: start another pass
                it = iter(batches)
                x, y = next(it)
            loss = step(x, y).item()
            # Exponential moving average, debiased for the first steps (as Adam's moments)
            avg = beta * avg + (1 - beta) * loss
            s = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            raw.append(loss)
            smooth.append(s)
            if not math.isfinite(s) or s > stop_div * best:
                break
            best = min(best, s)
    finally:
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    return lrs, raw, smooth


# ---------------------------------------------------------------------------------------------
# Suggestions: pure functions of (lrs, smoothed losses) -> a learning rate

def _trim(lrs, losses, skip_start, skip_end=5):
    """The curve without its first skip_start points (not yet trained) and last skip_end
    (diverging), and without non-finite losses; the whole finite curve when fewer than two
    points would be left (a sweep stopped early), where fastai gives no suggestion at all."""
    n = len(losses)
    keep = [(lr, l) for lr, l in list(zip(lrs, losses))[skip_start:max(0, n - skip_end)]
            if math.isfinite(l)]
    if len(keep) < 2:
        keep = [(lr, l) for lr, l in zip(lrs, losses) if math.isfinite(l)]
    if not keep:
        raise ValueError("the LR finder recorded no finite loss")
    return [k[0] for k in keep], [k[1] for k in keep]


def min_grad(lrs, losses, num_it=None):
    """fastai v1's suggestion (basic_train.py: Recorder.plot(suggestion=True)): the LR where
    the loss falls fastest, from np.gradient (central differences, one-sided at the ends) of
    the curve without its first 10 and last 5 points; the first such LR on a tie."""
    lrs, losses = _trim(lrs, losses, 10)
    return lrs[int(np.argmin(np.gradient(np.array(losses))))]


def valley(lrs, losses, num_it=None):
    """fastai v2's default (2021): the longest stretch where the loss keeps falling, a little
    past its middle: far enough from the start to be fast, early enough to be safe.

    As fastai v2 it skips the first num_it // 10 points of a sweep planned for num_it steps
    (default: as many as were taken) and the last 5.
    """
    lrs, losses = _trim(lrs, losses, (num_it or len(losses)) // 10)
    n = len(losses)
    run = [1] * n  # run[i]: length of the longest decreasing sequence ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return lrs[max(0, start + int(third) + int(third / 2))]


def steep(lrs, losses, num_it=None):
    """fastai v2's `steep`: the LR where the loss falls fastest per unit of log(lr), by forward
    differences (the left point of the steepest segment)."""
    lrs, losses = _trim(lrs, losses, (num_it or len(losses)) // 10)
    grads = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
             for i in range(len(losses) - 1)]
    return lrs[min(range(len(grads)), key=grads.__getitem__)]


def minimum(lrs, losses, num_it=None):
    """fastai v2's `minimum`: a tenth of the LR at the lowest loss (the minimum is too hot)."""
    lrs, losses = _trim(lrs, losses, (num_it or len(losses)) // 10)
    return lrs[min(range(len(losses)), key=losses.__getitem__)] / 10


SUGGESTIONS = {"valley": valley, "min_grad": min_grad, "steep": steep, "minimum": minimum}


def save_lr_find(prefix, lrs, raw, smooth, method="valley", num_it=None):
    """Write prefix.csv (lr, loss, smoothed) and prefix.png; return the suggested LR."""
    lr = SUGGESTIONS[method](lrs, smooth, num_it)
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed_loss"])
        w.writerows(zip(lrs, raw, smooth))
    # Plot what the suggestion saw: the smoothed curve without its diverging tail
    keep = min(len(smooth), max(2, len(smooth) - 5))
    y_at = smooth[lrs.index(lr)] if lr in lrs else min(smooth[:keep])
    line_plot(prefix + ".png", [(lrs[:keep], raw[:keep], "raw loss"),
                                (lrs[:keep], smooth[:keep], "smoothed loss")],
              "learning rate (log scale)", "loss", title=os.path.basename(prefix),
              logx=True, marks=[(lr, y_at, f"{method} {lr:.1e}")], colours=[LIGHT, COLOURS[0]])
    return lr


def find_lr(run, tensors, size, batch_size, frozen, tag):
    """Run the LR range test for one phase; write lrfind_<tag>.csv/.png; return the LR.

    Under torchrun every rank sweeps together: each step is the real data-parallel step on
    the global batch, and its loss is the mean over ranks, so the curve is the one global
    batch's. Each rank restores its own state; rank 0 writes the curve and its suggestion is
    every rank's."""
    freeze(run, frozen)
    batches = train_batches(run, tensors, size, batch_size, "lrfind_" + tag)
    c = run.cfg
    step = lambda x, y: ddp.all_mean(run.step(x, y))
    lrs, raw, smooth = lr_find(step, run.model, run.opt, batches, c.lr_find_steps,
                               c.lr_find_start, c.lr_find_end, c.lr_find_beta)
    lr = ddp.each(lambda: ddp.main() and save_lr_find(
        os.path.join(run.dir, "lrfind_" + tag), lrs, raw, smooth, c.suggest, c.lr_find_steps))
    return ddp.broadcast(lr)  # rank 0's


def main(argv=None):
    cfg, extra = parse_args(argv, doc=__doc__,
                            extra={"size": (int, 128, "image size in pixels"),
                                   "phase": (str, "frozen", "frozen | unfrozen")})
    size, phase = extra["size"], extra["phase"]
    if phase not in ("frozen", "unfrozen") or size < 8:
        raise SystemExit(f"--phase {phase} --size {size}: give --phase frozen or unfrozen and "
                         "a --size of at least 8 px")
    run = setup(cfg, sizes=[size])  # decode the images at this size only
    tensors = stage_tensors(run, size)
    tag = f"{size}_{phase}"
    lr = find_lr(run, tensors, size, int(cfg.batch_size.split(",")[0]), phase == "frozen", tag)
    print(f"suggested LR ({cfg.suggest}): {lr:.2e}; curve in {run.dir}/lrfind_{tag}.png")
    ddp.close()
    return lr


if __name__ == "__main__":
    record(data.run_cli)(main)  # torchrun: a failing rank's error, reported as its own
