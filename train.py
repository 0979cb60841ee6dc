"""Train COVID-ResNet (Farooq & Hafeez, arXiv 2003.14395): an ImageNet ResNet-50 fine-tuned on
chest radiographs in three stages of progressive resizing, 128 -> 224 -> 229 px.

    python train.py --demo                                  # phantoms, random init, CPU
    python train.py --data PATH                             # the paper's 41-epoch schedule
    python train.py --data PATH --stages 128,224 --unfrozen-epochs 5,10 --weights none

Each stage trains the head alone (body frozen, BatchNorm still learning), then the whole network,
each phase with its own LR range test (lrfind.py), a one-cycle schedule and, when unfrozen,
discriminative learning rates per layer group (schedule.py). The paper's stages, as reported:
128 px 3+5 epochs, 224 px 3+5, 229 px 0+25 at LRs 1e-6..1e-4: 41 epochs. They, and the rest of
the recipe (batch, one-cycle, optimizer, LR range test, augmentation), are one value that every
flag defaults to: schedule.PAPER, at the top of schedule.py. Every run writes runs/<name>/ with
its config, metrics, LR-finder curves, checkpoints and test metrics.

What it teaches, top to bottom: the plan (a list of phases, as data); one phase (start_phase,
max_lrs, fit); one step (fit's inner loop, and model.train_step). Read lrfind.py, schedule.py,
model.py and data.py next. What it leaves out, the run's machinery (flags, the run folder,
checkpoints and resume, devices and torch.compile, torchrun, the film cache, metrics and
plots), lives in machinery/, behind the named calls below.
"""
import os
import time
from dataclasses import dataclass, replace
from itertools import groupby
from operator import attrgetter

import torch.nn.functional as F

import data
from lrfind import suggest_lr
from machinery import ddp
from machinery.checkpoint import restore, resume_from, save_model, save_stage
from machinery.config import make_stages, parse_args
from machinery.ddp import on_main, run_main
from machinery.epochs import Books, MetricsLog, checkpoint_epoch, rollback_point
from machinery.hostmem import rows
from machinery.metrics import format_metrics
from machinery.plots import top_losses_plot
from machinery.report import stage_table, test_metrics, write_outputs
from machinery.run import add_time, compile_stage, forwards, setup, timed
from model import class_logits, gradcam, make_optimizer, set_body_frozen, train_step
from schedule import ONE_CYCLE, MaxLR, discriminative_lrs


@dataclass
class Phase:
    """One phase of the plan: a stage's head-only ("frozen") or whole-network ("unfrozen")
    training, with its own LR range test and one-cycle schedule."""
    stage: int  # 0-based
    name: str  # "frozen" | "unfrozen"
    size: int  # image size, px
    batch_size: int
    epochs: int
    lr: MaxLR  # max LR: auto (the LR finder's) | x | :x | lo:hi, parsed
    compiled: bool  # whether the stage runs torch.compile's model (--compile)
    first_epoch: int = 0  # a resumed run goes on after its last saved epoch
    lrs: list = None  # a resumed phase's max LR per layer group, as it chose them

    @property
    def frozen(self):
        return self.name == "frozen"

    @property
    def resumed(self):
        return self.first_epoch > 0

    @property
    def tag(self):  # names the phase's files and log lines: s1_128_frozen
        return f"s{self.stage + 1}_{self.size}_{self.name}"


def make_plan(cfg, stages, n_train, device):
    """The whole run as data: every stage's phases that have epochs, in order. `stages`: the
    flags' schedule.Stage records (make_stages); by default the paper's, PAPER.stages."""
    return [Phase(i, name, st.size, st.batch_size, epochs, MaxLR.parse(lr),
                  compile_stage(cfg, device, st, n_train))
            for i, st in enumerate(stages)
            for name, epochs, lr in [("frozen", st.frozen_epochs, st.lr_frozen),
                                     ("unfrozen", st.unfrozen_epochs, st.lr_unfrozen)]
            if epochs > 0]


def remaining(plan, state):
    """The plan less what a resumed run had finished (its last.pt `state`): the phases before
    the one it was in, and that phase's saved epochs, which it goes on after."""
    at = [(p.stage, p.name) for p in plan].index((state["stage"], state["phase_name"]))
    return [replace(plan[at], first_epoch=state["epoch"], lrs=state["lrs"])] + plan[at + 1:]


def start_phase(run, phase, previous):
    """Freeze or unfreeze the body, give the phase the optimizer fastai would, and choose
    what its steps call (eager or compiled; in DDP under torchrun, made after freezing, as DDP
    registers the parameters that train).

    --opt-reset fresh: a new Adam at every phase (fastai v1's freeze() and unfreeze() call
    create_opt: moments zero, step 0, beta1 0.9; the phase's LR finder runs on it); on-change:
    a new Adam only where the body is frozen or unfrozen, so that the paper's stage 3 goes on
    with stage 2's (fastai v1's fit reuses learn.opt); moments: moments zeroed, beta1 where
    the last schedule left it (fastai v2's clear_state); none: one Adam for the whole run.
    A resumed phase keeps the optimizer it saved.
    """
    set_body_frozen(run.model, phase.frozen)
    reset = run.cfg.opt_reset
    changed = previous is None or previous.frozen != phase.frozen
    if phase.resumed or reset == "none":
        pass
    elif reset == "fresh" or (reset == "on-change" and changed):
        run.opt = make_optimizer(run.model, run.cfg.wd, verbose=False)
    elif reset == "moments":
        run.opt.state.clear()  # AdamW makes its state anew at the next step
    run.forward, run.infer = forwards(run, phase.compiled)


def max_lrs(run, films, phase):
    """The phase's max LR of each layer group, from its spec (--lr-frozen, --lr-unfrozen):

    auto: the LR range test's suggestion: for every group when frozen (fastai's
          fit_one_cycle(lr)), fastai's slice(lr) when unfrozen: lr/10 for the body's groups;
    :x    fastai's slice(x); lo:hi: spread geometrically (schedule.discriminative_lrs);
    x     for every group.
    --no-discriminative: one LR for every group when unfrozen (lo:hi: hi).
    """
    n, spec = len(run.opt.param_groups), phase.lr
    if spec.form == "auto":
        lr = suggest_lr(run, films["train"], phase.size, phase.batch_size, phase.tag)
        print(f"  LR finder ({run.cfg.suggest}): {lr:.2e}")
        spread, top = not phase.frozen, lr
    elif spec.form == "x":
        return [spec.hi] * n
    else:  # :x, fastai's slice(x); lo:hi
        lr = spec.hi if spec.form == ":x" else (spec.lo, spec.hi)
        spread, top = True, spec.hi
    if not run.cfg.discriminative and not phase.frozen:
        return [top] * n
    return discriminative_lrs(lr, n) if spread else [lr] * n


def fit(run, phase, lrs, films, log):
    """fastai's fit_one_cycle: phase.epochs epochs of one cycle from the max LRs `lrs`, one per
    layer group; a resumed phase starts at phase.first_epoch.

    Each step sets the LR and beta1 (Adam's momentum) of every group by hand from the one-cycle
    schedule, then steps; each epoch ends with validation and its log line. The books around
    them (machinery/epochs.py) hold the loss on the device (no host sync per step), time and
    memory, a snapshot after every epoch (last.pt, written in the background), and the
    divergence guard: a NaN or infinite loss puts model and optimizer back as they were at
    the start of that epoch, and ends the phase.
    """
    c, one_cycle = run.cfg, ONE_CYCLE[run.cfg.one_cycle]
    batches = data.train_batches(run, films["train"], phase.size, phase.batch_size, phase.tag)
    total = phase.epochs * len(batches)  # one cycle over the whole phase
    rollback_point(run)
    for epoch in range(phase.first_epoch, phase.epochs):
        books = Books(run, f"{phase.tag} {epoch + 1}/{phase.epochs}")
        for i, (x, y) in enumerate(books.progress(batches.epoch(epoch))):
            k = epoch * len(batches) + i  # the step within the cycle
            for group, lr_max in zip(run.opt.param_groups, lrs):
                group["lr"], beta1 = one_cycle(k, total, lr_max, c.pct_start, c.div, c.div_final)
                group["betas"] = (beta1, group["betas"][1])
            loss = train_step(run.forward, run.opt, x, y, run.amp_dtype, run.loss_weight)
            books.add(loss, k)
        bad = books.end_training()  # the first step whose loss was not finite, or None
        if bad is not None:
            bad_lr = one_cycle(bad, total, lrs[-1], c.pct_start, c.div, c.div_final)[0]
            books.roll_back(bad_lr, total)
        val_loss, val_acc, _ = evaluate(run, films["val"], phase.size, phase.batch_size)
        row = books.row(phase, epoch, lrs, val_loss, val_acc)
        log.write(row, books.step_losses.tolist())
        checkpoint_epoch(run, phase, epoch, lrs)
        print(f"{phase.tag} epoch {epoch + 1}/{phase.epochs}: train loss "
              f"{row['train_loss']:.4f}, val loss {val_loss:.4f}, val acc "
              f"{100 * val_acc:.1f}%, {row['img_s']:.0f} img/s, {row['time']:.1f}s")
        if bad is not None:
            break


def evaluate(run, films, size, batch_size):
    """(mean loss, accuracy, class probabilities (N, C) on the CPU) of one split, unaugmented:
    the centre crop, as fastai v1 validates. Under torchrun each rank predicts its shard and
    every rank gets all the logits. No films (--val-frac 0): NaN.

    Batches of the training's size, the last one padded: the stage's one shape, which
    cuDNN has tuned its algorithms for already (and a compiled model has its graph for)."""
    images, labels, hw = films
    if len(labels) == 0:
        return float("nan"), float("nan"), None
    lo, hi = ddp.shard(len(labels))  # this rank's rows (all of them in one process)
    batches = data.eval_batches(rows(images, lo, hi), size, None if hw is None else hw[lo:hi],
                                batch_size, pad=True, channels_last=run.channels_last)
    logits = class_logits(run.model, run.infer, batches, run.amp_dtype)
    logits = ddp.gather_rows(logits, len(labels))
    loss = F.cross_entropy(logits, labels, weight=run.loss_weight, reduction="sum")
    accuracy = (logits.argmax(1) == labels).float().sum().item() / len(labels)
    return loss.item() / len(labels), accuracy, logits.softmax(1).cpu()


def main(cfg):
    started = time.time()
    state = None
    if cfg.resume:  # the run folder's saved config, and its last.pt
        cfg, state = resume_from(cfg)
    run = setup(cfg)  # the data read, checked, decoded; the model, its optimizer; the folder
    run.started = started
    add_time(run, "setup", time.time() - started)
    stages = make_stages(cfg)
    plan = make_plan(cfg, stages, len(run.items["train"]), run.device)
    if state:  # weights, optimizer, generators and history as saved; the plan less what's done
        restore(run, state)
        plan = remaining(plan, state)
    with MetricsLog(run) as log:
        previous = None
        for i, phases in groupby(plan, attrgetter("stage")):
            st, phases = stages[i], list(phases)
            print(f"\n== stage {i + 1}/{len(stages)}: {st.size} px, head {st.frozen_epochs} "
                  f"+ all layers {st.unfrozen_epochs} epochs, batch {st.batch_size}, "
                  f"compiled: {'yes' if phases[0].compiled else 'no'}")
            films = None  # the last stage's films leave the device before these come
            films = data.stage_films(run, st.size)
            for phase in phases:
                start_phase(run, phase, previous)
                if phase.resumed:
                    lrs = phase.lrs  # as chosen before the interruption
                else:
                    with timed(run, "lr_find"):
                        lrs = max_lrs(run, films, phase)
                print(f"  {phase.tag}: max LR per group " + ", ".join(
                    f"{g['name']} {lr:.1e}" for g, lr in zip(run.opt.param_groups, lrs)))
                fit(run, phase, lrs, films, log)
                previous = phase
            print("\n" + stage_table([r for r in run.history if r["stage"] == i]))
            if i + 1 < len(stages):  # the last stage's weights: model.pt
                on_main(save_stage, run, i + 1, st.size)
    if plan[-1].size != stages[-1].size:  # a last stage with no epochs: its size all the same
        films = data.stage_films(run, stages[-1].size)
    return finish(run, films, stages[-1].size, stages[-1].batch_size)


def finish(run, films, size, batch_size):
    """Save the model; then the test split, touched once: at the last stage's size, no
    augmentation. Its metrics (with intervals), predictions and report.md; last.pt goes."""
    on_main(save_model, run, size)  # model.pt, once a last.pt write still going has ended
    run.timings["checkpoint_writes"] = run.ckpt.stats["write_s"]  # in the background
    with timed(run, "eval"):
        _, _, probs = evaluate(run, films["test"], size, batch_size)
    m = test_metrics(run, probs)  # with intervals; the run's timings
    on_main(top_losses, run, films["test"], size, probs)  # before report.md, which shows it
    on_main(write_outputs, run, m, probs)  # and last.pt goes: only --resume reads it
    print(f"\n== test split ({len(probs)} images, {size} px)\n" + format_metrics(m))
    print(f"\nrun folder: {run.dir} (report.md); seconds: " +
          ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    return m


def top_losses(run, films, size, probs, k=9):
    """top_losses.png: the k test films the model was most wrong about (fastai's
    plot_top_losses(heatmap=True)), each as the model saw it with the Grad-CAM of the class
    it predicted; captions: true / predicted / the true class's probability."""
    images, labels, hw = films
    p_true = probs[range(len(probs)), labels.cpu()]
    tiles = []
    for i in p_true.argsort()[:k].tolist():  # the largest losses: the lowest p(true)
        x = data.view(images[i:i + 1].float() / 255, size, None if hw is None else hw[i:i + 1])
        pred = int(probs[i].argmax())
        cam = gradcam(run.model, data.normalize(x, run.channels_last), pred)
        tiles.append((x[0, 0].cpu(), cam.cpu(), f"{run.classes[int(labels[i])]} / "
                      f"{run.classes[pred]} / {float(p_true[i]):.2f}"))
    top_losses_plot(os.path.join(run.dir, "top_losses.png"), tiles)


if __name__ == "__main__":  # on every rank under torchrun; the process group left at the end
    run_main(main, parse_args(doc=__doc__))
