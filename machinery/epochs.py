"""What train.fit does around the recipe, each epoch: the books (loss, time, memory, progress
bar), the divergence guard, the log and the checkpoint.

    rollback_point(run)                    # the state a first epoch that diverges goes back to
    books = Books(run, f"{tag} 1/5")       # one epoch
    for x, y in books.progress(batches): ...; books.add(loss, k)   # no host sync per step
    bad = books.end_training()             # waits once; the first non-finite loss, any rank
    books.roll_back(lr, total)             # weights and optimizer as the epoch began
    row = books.row(phase, epoch, lrs, val_loss, val_acc); log.write(row)
    checkpoint_epoch(run, phase, epoch, lrs)   # snapshot; last.pt written in the background

Under torchrun the losses are means over ranks, img/s counts every rank's images, and a bad
loss on any rank rolls every rank back.
"""
import csv
import json
import os
import time

import torch

from machinery import ddp, devices
from machinery.checkpoint import rng_state, save_checkpoint
from machinery.run import add_time


class Books:
    """One training epoch's accounts, kept on the device while it runs: each step's loss, the
    step of the first NaN or infinite loss; its time and peak memory; a progress bar."""

    def __init__(self, run, desc):
        self.run, self.desc, self.t0 = run, desc, time.time()
        self.first_bad = torch.full((), -1, device=run.device)  # step of the first bad loss
        self.steps, self.shown, self.bar, self.bad = 0, None, None, None
        devices.reset_peak(run.device)

    def progress(self, batches):
        self.batch_size, self.n_batches = batches.bs, len(batches)
        self.step_losses = torch.zeros(len(batches), device=self.run.device)  # steps.csv
        self.bar = ddp.progress(batches, self.desc)
        return self.bar

    def add(self, loss, k):
        """After step k of the phase: no host sync, the loss stays on the device."""
        self.step_losses[self.steps] = loss.detach()  # summed once, at the epoch's end
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), k,
                                     self.first_bad)
        if k == 0:  # the phase's first step: autotuning, and compilation where on
            devices.sync(self.run.device)
            add_time(self.run, "first_steps", time.time() - self.t0)
        # every 10 steps, the bar shows the last loss copied to the host that has arrived
        # (a copy queued without waiting; reading it never stalls the device)
        if self.steps % 10 == 0 and (self.shown is None or self.shown.ready()):
            if self.shown is not None:
                self.bar.set_postfix(
                    loss=f"{self.shown.value():.3f}",
                    lr=f"{self.run.opt.param_groups[-1]['lr']:.1e}",
                    img_s=f"{(self.steps + 1) * self.batch_size / (time.time() - self.t0):.0f}")
            self.shown = devices.HostCopy(loss)
        self.steps += 1

    def end_training(self):
        """Wait for the device; return the step of the first non-finite loss on any rank, or
        None. Under torchrun the summed loss becomes the mean over ranks, and every rank takes
        rank 0's BatchNorm statistics."""
        devices.sync(self.run.device)
        self.train_time = time.time() - self.t0
        never = torch.iinfo(self.first_bad.dtype).max
        bad = int(ddp.all_min(torch.where(self.first_bad < 0, never, self.first_bad)).item())
        self.loss_sum = ddp.all_mean(self.step_losses[:self.steps].sum())
        ddp.broadcast_buffers(self.run.model)
        self.bad = None if bad == never else bad
        return self.bad

    def roll_back(self, lr, total):
        """The loss was not finite at step self.bad of `total` (head LR `lr`): model and
        optimizer go back to their state at the start of this epoch (the last snapshot)."""
        self.run.ckpt.restore()
        self.bad_lr = lr
        print(f"{self.desc}: the loss was not finite at step {self.bad + 1} of {total} (head "
              f"LR {lr:.2e}). Weights and optimizer are back at the start of this epoch; this "
              "phase ends here. A lower LR may help.")

    def row(self, phase, epoch, lrs, val_loss, val_acc):
        """The epoch's line of metrics.jsonl (validation done: its time counts as eval)."""
        run, world = self.run, ddp.world()
        add_time(run, "train", self.train_time)
        add_time(run, "eval", time.time() - self.t0 - self.train_time)
        row = {"phase": phase.tag, "stage": phase.stage, "phase_name": phase.name,
               "epoch": epoch + 1, "train_loss": self.loss_sum.item() / self.n_batches,
               "val_loss": val_loss, "val_acc": val_acc, "lr": lrs[-1], "max_lrs": lrs,
               "img_s": self.n_batches * self.batch_size * world / self.train_time,
               "time": time.time() - self.t0}
        if world > 1:
            row.update(ranks=world, img_s_per_rank=row["img_s"] / world)
        if devices.peak_gib(run.device) is not None:  # tensors; and what torch holds
            row["peak_gib"] = devices.peak_gib(run.device)
            row["peak_reserved_gib"] = devices.peak_gib(run.device, reserved=True)
        if self.bad is not None:
            row.update(train_loss=float("nan"), diverged_at_step=self.bad + 1,
                       diverged_lr=self.bad_lr)
        return row


class MetricsLog:
    """metrics.jsonl and metrics.csv (rank 0; the other ranks write nothing) and run.history:
    one line per epoch, flushed as it is written (the CSV for spreadsheets and pandas, its
    columns those of the first epoch, its stages numbered from 1 as in the phases' names,
    where the JSON keeps the plan's index, from 0); steps.csv: every training step's loss
    (rank 0's, as its device computed it). A resumed run's logs start with what they had logged."""

    def __init__(self, run):
        self.run = run
        path = {n: os.path.join(run.dir, n) if run.dir else os.devnull
                for n in ("metrics.jsonl", "metrics.csv", "steps.csv")}
        self.f = open(path["metrics.jsonl"], "w")
        self.c = open(path["metrics.csv"], "w", newline="")
        kept = []
        if run.history and os.path.isfile(path["steps.csv"]):  # resumed: keep the steps of the
            with open(path["steps.csv"]) as f:  # epochs its checkpoint holds, not those after
                kept = [line for line in f.readlines()[1:]
                        if line.endswith("\n") and int(line.split(",")[0]) <= len(run.history)]
        self.s = open(path["steps.csv"], "w", newline="")
        self.s.write("epoch,step,loss\n")  # epoch: the row's number in metrics.jsonl
        self.s.writelines(kept)
        self.csv = None
        for row in run.history:
            self.log(row)

    def log(self, row):
        self.f.write(json.dumps(row) + "\n")
        if self.csv is None:
            self.csv = csv.DictWriter(self.c, list(row), extrasaction="ignore")
            self.csv.writeheader()
        self.csv.writerow({**row, "stage": row["stage"] + 1})  # from 1, as s1_128_frozen

    def write(self, row, step_losses=()):
        self.run.history.append(row)
        self.log(row)
        n = len(self.run.history)
        self.s.writelines(f"{n},{k + 1},{loss!r}\n" for k, loss in enumerate(step_losses))
        for f in (self.f, self.c, self.s):
            f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.f, self.c, self.s):
            f.close()


def rollback_point(run):
    """Snapshot the state now: what a phase's first epoch goes back to if it diverges."""
    with ddp.fail_together():
        run.ckpt.take()


def checkpoint_epoch(run, phase, epoch, lrs):
    """After each epoch: snapshot the run (host memory; what a diverging epoch rolls back to)
    and write it to last.pt in the background (rank 0). Every rank's generators go with it
    (its dropout's), so that a resume under torchrun goes on as each rank would have."""
    t0 = time.time()
    run.timings["elapsed"] = t0 - run.started  # this run's time so far, resumes included
    extra = dict(stage=phase.stage, size=phase.size, phase_name=phase.name, epoch=epoch + 1,
                 phase_epochs=phase.epochs, lrs=lrs, history=run.history,
                 timings=run.timings, ranks=ddp.world())
    if ddp.world() > 1:
        extra["rng_ranks"] = ddp.all_objects(rng_state(run.device))
    with ddp.fail_together():
        run.ckpt.take(**extra)
        run.ckpt.write()
        # --save-best: the weights of the lowest validation loss so far (resumes included)
        if ddp.main() and run.cfg.save_best and run.history[-1]["val_loss"] <= min(
                r["val_loss"] for r in run.history):
            save_checkpoint(run, os.path.join(run.dir, "best.pt"), size=phase.size,
                            stage=phase.stage + 1, epoch=len(run.history),
                            val_loss=run.history[-1]["val_loss"])
    add_time(run, "checkpoint", time.time() - t0)
