"""Leslie Smith's LR range test (Smith, "Cyclical Learning Rates", 2017), as fastai's lr_find.

Train for a few steps while the learning rate grows exponentially, watch the loss, and read a
good learning rate off the curve; then put the model and optimizer back exactly as they were.
The reading: `min_grad` (fastai v1's, the paper's), or `valley` (fastai v2's, our default: on
flat, noisy curves min_grad lands in the noise at the low end; FIDELITY.md has the numbers).

    python lrfind.py --data PATH --size 128              # head only (the body frozen)
    python lrfind.py --data phantom --size 64 --phase unfrozen --weights none

From Python: lrs, raw, smooth = lr_find(step, model, opt, batches); valley(lrs, smooth).

What it teaches: the sweep (lr_find), the readings of its curve (pure functions of the
losses), and one phase's test (suggest_lr: the sweep on the phase's own model, optimizer
and batches). The plot is machinery/plots.py's; the weight decay of the sweep is the
optimizer's, as in fastai.
"""
import collections
import copy
import csv
import json
import math
import os
from dataclasses import fields

import numpy as np

from data import stage_films, train_batches
from machinery import config, ddp, devices
from machinery.ddp import MeanLoss, on_main, run_main
from machinery.plots import COLOURS, LIGHT, line_plot
from machinery.run import forwards, setup
from model import set_body_frozen, train_step
from schedule import PAPER, lr_sweep


def lr_find(step, model, opt, batches, n_steps=PAPER.lr_find_steps,
            lr_start=PAPER.lr_find_start, lr_end=PAPER.lr_find_end, beta=PAPER.lr_find_beta,
            stop_div=4.0, lag=3):
    """Sweep the LR; return (lrs, raw losses, smoothed losses), one entry per step taken.

    step(x, y) runs forward, backward and the optimizer step and returns the loss tensor.
    Stops once the smoothed loss exceeds stop_div times its best or is not finite. The model
    and optimizer state are restored afterwards, bit for bit, also when the sweep is interrupted.

    Each loss is read `lag` steps late, so that the device never waits for the host: the
    sweep may run past the step where it stops by that many steps, which change nothing
    (the curve ends at that step; model, optimizer and dropout's generator go back).
    """
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    curve, late = Curve(beta, stop_div), LateLosses()
    try:
        it = iter(batches)
        for i in ddp.progress(range(n_steps), "lr_find"):  # a bar on rank 0
            lr = lr_sweep(i, n_steps, lr_start, lr_end)
            for g in opt.param_groups:  # one LR for every layer group during the sweep
                g["lr"] = lr
            try:
                x, y = next(it)
            except StopIteration:  # small data sets: start another pass
                it = iter(batches)
                x, y = next(it)
            late.add(lr, step(x, y))
            if len(late.queue) > lag and not curve.add(*late.read()):
                break  # diverged
        else:  # the last steps' losses
            while late.queue and curve.add(*late.read()):
                pass
    finally:
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    if curve.raw:  # dropout's generator as the last step read left it, not the ones after
        devices.set_generator_state(late.device, late.generator)
    return curve.lrs, curve.raw, curve.smooth


class Curve:
    """The sweep's curve: each step's LR, its loss, and the loss smoothed by an exponential
    moving average, debiased for the first steps (as Adam's moments)."""

    def __init__(self, beta, stop_div):
        self.beta, self.stop_div = beta, stop_div
        self.lrs, self.raw, self.smooth = [], [], []
        self.avg, self.best = 0.0, math.inf

    def add(self, lr, loss):
        """A step's loss into the curve; False once it diverges: stop the sweep here."""
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        s = self.avg / (1 - self.beta ** (len(self.raw) + 1))
        self.lrs.append(lr)
        self.raw.append(loss)
        self.smooth.append(s)
        if not math.isfinite(s) or s > self.stop_div * self.best:
            return False
        self.best = min(self.best, s)
        return True


class LateLosses:
    """Steps' losses read some steps late, so that the device never waits for the host: each
    copied to the host without waiting (HostCopy), with dropout's generator after its step."""

    def __init__(self):
        self.queue = collections.deque()  # steps taken, not read yet
        self.device = self.generator = None

    def add(self, lr, loss):
        self.device = loss.device
        self.queue.append((lr, devices.HostCopy(loss), devices.generator_state(loss.device)))

    def read(self):
        """(lr, loss) of the oldest step not read; its generator state is kept."""
        lr, loss, self.generator = self.queue.popleft()
        return lr, loss.value()


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


def min_grad(lrs, losses, num_it=None, skip_start=10):
    """fastai v1's suggestion (basic_train.py: Recorder.plot(suggestion=True)): the LR where
    the loss falls fastest, from np.gradient (central differences, one-sided at the ends) of
    the curve without its first skip_start (10, Recorder.plot's default) and last 5 points;
    the first such LR on a tie. num_it is not used: fastai v1 skips those 10 points whatever
    the sweep's length (the other readings skip a tenth of it)."""
    lrs, losses = _trim(lrs, losses, skip_start)
    return lrs[int(np.argmin(np.gradient(np.array(losses))))]


def valley(lrs, losses, num_it=None):
    """fastai v2's default (2021): the longest stretch where the loss keeps falling, and the
    point about halfway along it: far enough from the start to be fast, early enough to be
    safe. As fastai v2 counts it, the point is start + int(L/3) + int(L/6) for a stretch of
    L steps from `start` (the point before its first): at or just before its middle.

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


def title_of(name):
    """lrfind_s2_224_unfrozen -> 'LR range test: stage 2, 224 px, all layers' (lrfind.py's own
    lrfind_224_frozen: no stage)."""
    words = []
    for part in name.removeprefix("lrfind_").split("_"):
        if part.startswith("s") and part[1:].isdigit():
            words.append(f"stage {part[1:]}")
        elif part.isdigit():
            words.append(f"{part} px")
        else:
            words.append({"frozen": "head only (body frozen)", "unfrozen": "all layers"}.get(
                part, part))
    return "LR range test: " + ", ".join(words)


def save_lr_find(prefix, lrs, raw, smooth, method=PAPER.suggest, num_it=None, body_div=None):
    """Write prefix.csv (lr, loss, smoothed) and prefix.png; return the suggested LR. body_div:
    the body's groups train at LR / body_div (fastai's slice(lr): 10), marked too."""
    lr = SUGGESTIONS[method](lrs, smooth, num_it)
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed_loss"])
        w.writerows(zip(lrs, raw, smooth))
    # Plot what the suggestion saw: the smoothed curve without its diverging tail
    keep = min(len(smooth), max(2, len(smooth) - 5))
    y_at = smooth[lrs.index(lr)] if lr in lrs else min(smooth[:keep])
    marks = [(lr, y_at, f"{method} {lr:.1e}")]
    if body_div:  # where the body's groups sit on the same curve
        near = int(np.argmin([abs(math.log(x * body_div / lr)) for x in lrs[:keep]]))
        marks.append((lr / body_div, smooth[near], f"body {lr / body_div:.1e}"))
    line_plot(prefix + ".png", [(lrs[:keep], raw[:keep], "raw loss"),
                                (lrs[:keep], smooth[:keep], "smoothed loss")],
              "learning rate (log scale)", "loss", title=title_of(os.path.basename(prefix)),
              logx=True, marks=marks, colours=[LIGHT, COLOURS[0]])
    return lr


def suggest_lr(run, films, size, batch_size, tag):
    """One phase's LR range test: the sweep on the phase's model and optimizer (its body
    frozen or not, as the phase set it) and its own draws of augmented batches; the curve
    written to lrfind_<tag>.csv/.png; the suggested LR (--suggest) returned.

    Under torchrun every rank sweeps together: each step is the real data-parallel step on
    the global batch, and its loss is the mean over ranks, so the curve is the one global
    batch's. Each rank restores its own state; rank 0 writes the curve and its suggestion is
    every rank's."""
    c = run.cfg
    batches = train_batches(run, films, size, batch_size, "lrfind_" + tag)
    step = MeanLoss(train_step, run)  # under torchrun, the loss of the global batch
    lrs, raw, smooth = lr_find(step, run.model, run.opt, batches, c.lr_find_steps,
                               c.lr_find_start, c.lr_find_end, c.lr_find_beta)
    body = 10 if tag.endswith("unfrozen") and c.discriminative else None  # slice(lr)
    # rank 0 writes the curve (run.dir: None on the others); its suggestion, on every rank
    return on_main(save_lr_find, os.path.join(run.dir or "", "lrfind_" + tag), lrs, raw,
                   smooth, c.suggest, c.lr_find_steps, body)


# The flags lrfind.py offers: train.py's, less those of training's schedule and run folder
TRAINING_ONLY = {"stages", "frozen_epochs", "unfrozen_epochs", "lr_frozen", "lr_unfrozen",
                 "one_cycle", "pct_start", "div", "div_final", "opt_reset", "discriminative",
                 "compile", "compile_backend", "resume", "config", "save_every", "keep_last",
                 "save_best"}
FLAGS = [f.name for f in fields(config.Config) if f.name not in TRAINING_ONLY]


EXTRA = {"size": (int, 128, "image size in pixels"),
         "phase": (str, "frozen", "frozen (the head alone trains) | unfrozen")}


def make_parser():
    return config.make_parser(__doc__, FLAGS, EXTRA)


def main(argv=None):
    cfg, extra = config.parse_args(argv, EXTRA, __doc__, FLAGS)
    size, phase = extra["size"], extra["phase"]
    if phase not in ("frozen", "unfrozen") or size < 8:
        raise SystemExit(f"--phase {phase} --size {size}: give --phase frozen or unfrozen and "
                         "a --size of at least 8 px")
    run = setup(cfg, sizes=[size])  # decode the images at this size only
    films = stage_films(run, size)
    set_body_frozen(run.model, phase == "frozen")
    run.forward, run.infer = forwards(run, compiled=False)
    tag = f"{size}_{phase}"
    lr = suggest_lr(run, films["train"], size, int(cfg.batch_size.split(",")[0]), tag)
    print(f"suggested LR ({cfg.suggest}): {lr:.2e}; curve in {run.dir}/lrfind_{tag}.png")
    # the folder's kind: compare.py and ablate.py know it is not a training run
    on_main(write_json, os.path.join(run.dir or "", "lrfind.json"), {
        "kind": "lrfind", "size": size, "phase": phase, "suggest": cfg.suggest, "lr": lr})
    return lr


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


if __name__ == "__main__":  # on every rank under torchrun; the process group left at the end
    run_main(main)
