"""Train COVID-ResNet (Farooq & Hafeez, arXiv 2003.14395): an ImageNet ResNet-50 fine-tuned on
chest radiographs in three stages of progressive resizing, 128 -> 224 -> 229 px.

    python train.py --demo                                  # phantoms, random init, CPU
    python train.py --data PATH                             # the paper's 41-epoch schedule
    python train.py --data PATH --stages 128,224 --unfrozen-epochs 5,10 --weights none

Each stage trains the head alone (body frozen, BatchNorm still learning), then the whole network,
each phase with its own LR range test (lrfind.py), a one-cycle schedule and, when unfrozen,
discriminative learning rates per layer group (schedule.py). The paper's stages, as reported:
128 px 3+5 epochs, 224 px 3+5, 229 px 0+25 at LRs 1e-6..1e-4: 41 epochs. Every run writes
runs/<name>/ with its config, metrics, LR-finder curves, checkpoints and test metrics.
"""
import json
import os
import time

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import data
import ddp
import devices
from checkpoint import load_optimizer, resume_from, rng_state, save_checkpoint, set_rng_state
from config import make_stages, parse_args
from lrfind import find_lr
from metrics import classification_metrics, format_metrics
from report import stage_table, write_predictions, write_report
from runner import (add_time, freeze, predict, setup, stage_tensors, start_phase, train_batches,
                    use_compile)
from schedule import ONE_CYCLE, discriminative_lrs


def resolve_lrs(run, tensors, size, batch_size, frozen, spec, tag):
    """Max LR per layer group from 'auto' | 'x' | ':x' | 'lo:hi' (schedule.discriminative_lrs).

    --no-discriminative: one LR for every group (auto: the finder's; lo:hi: hi)."""
    n = len(run.opt.param_groups)
    one = frozen or not run.cfg.discriminative
    if spec == "auto":
        lr = find_lr(run, tensors, size, batch_size, frozen, tag)
        print(f"  LR finder ({run.cfg.suggest}): {lr:.2e}")
        # unfrozen: fastai's slice(lr), a tenth of it for the body
        return [lr] * n if one else discriminative_lrs(lr, n)
    if spec.startswith(":"):  # fastai's slice(x): x for the head, x/10 for the body
        return [float(spec[1:])] * n if one and not frozen else \
            discriminative_lrs(float(spec[1:]), n)
    if ":" in spec:
        lo, hi = spec.split(":")
        return [float(hi)] * n if one and not frozen else \
            discriminative_lrs((float(lo), float(hi)), n)
    return [float(spec)] * n


def fit(run, tensors, size, batch_size, epochs, lrs, tag, log, where, start=0):
    """fastai's fit_one_cycle: `epochs` epochs, LR and beta1 of each group set by hand each step.

    A NaN or infinite loss ends the phase: model and optimizer go back to their state at the
    start of that epoch (run.ckpt's snapshot), and the step and LR where it happened are
    reported. After each epoch run.ckpt snapshots the state and writes last.pt in the
    background (where: the stage and phase); a resumed phase starts at epoch `start`.
    Under torchrun the losses logged are the means over ranks, img/s counts every rank's
    images, and a bad loss on any rank rolls every rank back.
    """
    c, sched, dev = run.cfg, ONE_CYCLE[run.cfg.one_cycle], run.device
    batches = train_batches(run, tensors, size, batch_size, tag)
    total, k, rows = epochs * len(batches), start * len(batches), []
    ddp.each(run.ckpt.take)  # what a first epoch that diverges goes back to
    for epoch in range(start, epochs):
        t0, loss_sum, shown = time.time(), torch.zeros((), device=dev), None
        devices.reset_peak(dev)
        first_bad = torch.full((), -1, device=dev)  # step of the first bad loss
        bar = tqdm(batches.epoch(epoch), desc=f"{tag} {epoch + 1}/{epochs}", leave=False,
                   disable=not ddp.main())
        for i, (x, y) in enumerate(bar):
            for g, lr_max in zip(run.opt.param_groups, lrs):
                g["lr"], mom = sched(k, total, lr_max, c.pct_start, c.div, c.div_final)
                g["betas"] = (mom, g["betas"][1])
            loss = run.step(x, y)
            loss_sum += loss
            # noted on the device, read once per epoch: no host sync in the step
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), k, first_bad)
            k += 1
            if k == 1:  # the phase's first step: autotuning, and compilation where on
                devices.sync(dev)
                add_time(run, "first_steps", time.time() - t0)
            if i % 10 == 0:  # show the loss of 10 steps ago: reading it waits for that
                # step only, while the device keeps working on the ones queued since
                if shown is not None:
                    bar.set_postfix(loss=f"{shown.item():.3f}",
                                    lr=f"{run.opt.param_groups[-1]['lr']:.1e}",
                                    img_s=f"{(i + 1) * batch_size / (time.time() - t0):.0f}")
                shown = loss
        devices.sync(dev)
        train_time = time.time() - t0
        never = torch.iinfo(first_bad.dtype).max  # the first bad step on any rank
        bad = int(ddp.all_min(torch.where(first_bad < 0, never, first_bad)).item())
        bad = -1 if bad == never else bad
        loss_sum = ddp.all_mean(loss_sum)
        ddp.broadcast_buffers(run.model)  # rank 0's BatchNorm statistics, on every rank
        if bad >= 0:
            run.ckpt.restore()
            bad_lr = sched(bad, total, lrs[-1], c.pct_start, c.div, c.div_final)[0]
            print(f"{tag}: the loss was not finite at step {bad + 1} of {total} (head LR "
                  f"{bad_lr:.2e}). Weights and optimizer are back at the start of epoch "
                  f"{epoch + 1}; this phase ends here. A lower LR may help.")
        val_loss, val_acc, _ = predict(run, *tensors["val"], size) if len(tensors["val"][1]) \
            else (float("nan"), float("nan"), None)
        add_time(run, "train", train_time)
        add_time(run, "eval", time.time() - t0 - train_time)
        row = {"phase": tag, **where, "epoch": epoch + 1,
               "train_loss": loss_sum.item() / len(batches),
               "val_loss": val_loss, "val_acc": val_acc, "lr": lrs[-1], "max_lrs": lrs,
               "img_s": len(batches) * batch_size * ddp.world() / train_time,
               "time": time.time() - t0}
        if ddp.world() > 1:
            row.update(ranks=ddp.world(), img_s_per_rank=row["img_s"] / ddp.world())
        if devices.peak_gib(dev) is not None:
            row["peak_gib"] = devices.peak_gib(dev)
        if bad >= 0:
            row.update(train_loss=float("nan"), diverged_at_step=bad + 1, diverged_lr=bad_lr)
        rows.append(row)
        run.history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        t1 = time.time()
        run.timings["elapsed"] = t1 - run.started  # this run's time so far, resumes included
        # every rank's generators (its dropout's), so that a resume under torchrun goes on
        # as each rank would have; rank 0 writes them with its snapshot
        rngs = ddp.all_objects(rng_state(dev)) if ddp.world() > 1 else None
        ddp.each(lambda: (run.ckpt.take(
            **where, epoch=epoch + 1, phase_epochs=epochs, lrs=lrs, history=run.history,
            timings=run.timings, ranks=ddp.world(), **({"rng_ranks": rngs} if rngs else {})),
            run.ckpt.write()))
        add_time(run, "checkpoint", time.time() - t1)
        print(f"{tag} epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, "
              f"val loss {val_loss:.4f}, val acc {100 * val_acc:.1f}%, "
              f"{row['img_s']:.0f} img/s, {row['time']:.1f}s")
        if bad >= 0:
            break
    return rows


def write_outputs(run, m, probs):
    """The test split's metrics, predictions and the run's report.md."""
    with open(os.path.join(run.dir, "test_metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    write_predictions(os.path.join(run.dir, "test_predictions.csv"), run.items["test"],
                      run.items["test"].labels, probs.tolist(), run.classes)
    write_report(run.dir)


def main(cfg):
    t_start = time.time()
    state = None
    if cfg.resume:
        cfg, state = resume_from(cfg)
    run = setup(cfg)
    add_time(run, "setup", time.time() - t_start)  # reading, decoding or cache, model
    stages = make_stages(cfg)
    done = set()  # (stage, phase) pairs finished before a resume
    if state:
        run.model.load_state_dict(state["model"])
        load_optimizer(run.opt, state["opt"])  # in the weights' layout, which may be new
        same_world = state.get("ranks", 1) == ddp.world()
        note = set_rng_state(state["rng_ranks"][ddp.rank()] if same_world and
                             "rng_ranks" in state else state["rng"], run.device)
        if not same_world:
            ddp.seed_rank(cfg.seed + len(state["history"]))  # each rank its own dropout
            note = (f"{note}; " if note else "") + (
                f"saved by {state.get('ranks', 1)} process(es), resumed by {ddp.world()}: "
                "the global batch and the batches it draws change")
        if note:
            print(f"note: {run.dir} was {note}; it is not bit for bit the uninterrupted run")
        run.history, run.timings = state["history"], state["timings"]
        t_start -= run.timings.get("elapsed", 0.0)  # the time before the kill counts too
        done = {(r["stage"], r["phase_name"]) for r in run.history} - \
            {(state["stage"], state["phase_name"])}
        print(f"resuming {run.dir} after epoch {state['epoch']} of {state['phase_name']} "
              f"in stage {state['stage'] + 1}")
    run.started = t_start
    # rank 0 logs; the other ranks (run.dir None) write nothing
    with open(os.path.join(run.dir, "metrics.jsonl") if run.dir else os.devnull, "w") as log:
        for row in run.history:  # what the interrupted run had logged
            log.write(json.dumps(row) + "\n")
        for i, st in enumerate(stages):
            if state and i < state["stage"]:
                continue
            print(f"\n== stage {i + 1}/{len(stages)}: {st.size} px, head {st.frozen_epochs} "
                  f"+ all layers {st.unfrozen_epochs} epochs, batch {st.batch_size}, "
                  f"compiled: {'yes' if use_compile(run, st) else 'no'}")
            tensors = None  # the last stage's films leave the device before these come
            tensors = stage_tensors(run, st.size)
            for phase, epochs, spec in [("frozen", st.frozen_epochs, st.lr_frozen),
                                        ("unfrozen", st.unfrozen_epochs, st.lr_unfrozen)]:
                if epochs == 0 or (i, phase) in done:
                    continue
                tag = f"s{i + 1}_{st.size}_{phase}"
                where = dict(stage=i, phase_name=phase)
                if state and (i, phase) == (state["stage"], state["phase_name"]):
                    freeze(run, phase == "frozen")  # optimizer as saved
                    lrs, start = state["lrs"], state["epoch"]
                    state = None  # from here on, as if never interrupted
                else:
                    start_phase(run, phase == "frozen")
                    t0 = time.time()
                    lrs = resolve_lrs(run, tensors, st.size, st.batch_size, phase == "frozen",
                                      spec, tag)
                    add_time(run, "lr_find", time.time() - t0)
                    start = 0
                print(f"  {tag}: max LR per group " + ", ".join(
                    f"{g['name']} {lr:.1e}" for g, lr in zip(run.opt.param_groups, lrs)))
                fit(run, tensors, st.size, st.batch_size, epochs, lrs, tag, log, where, start)
            # the stage's table, as report.md shows it
            print("\n" + stage_table([r for r in run.history if r["stage"] == i]))
            ddp.each(lambda: ddp.main() and save_checkpoint(
                run, os.path.join(run.dir, f"stage{i + 1}_{st.size}.pt"), stage=i + 1,
                size=st.size))
    ddp.each(lambda: ddp.main() and save_checkpoint(run, os.path.join(run.dir, "model.pt"),
                                                    size=stages[-1].size))
    ddp.each(run.ckpt.close)  # a last.pt write still going ends before the run reports
    run.timings["checkpoint_writes"] = run.ckpt.stats["write_s"]  # in the background
    differ = ddp.max_difference(run.model)  # torchrun: every rank must hold rank 0's model
    if differ:
        raise RuntimeError(f"the ranks' models differ after training (by up to {differ:.3g}): "
                           "their steps were not the same")

    # The test split, touched once: at the last stage's size, no augmentation
    t0 = time.time()
    _, _, probs = predict(run, *tensors["test"], stages[-1].size)
    add_time(run, "eval", time.time() - t0)
    m = classification_metrics(run.items["test"].labels, probs.argmax(1).tolist(), run.classes,
                               run.items["test"].sources, probs.tolist())
    m["timings_s"] = {**run.timings, "total": time.time() - t_start}
    m["timings_s"].pop("elapsed", None)
    if ddp.world() > 1:  # checked above: the weights and buffers of every rank are rank 0's
        m["ranks"] = {"n": ddp.world(), "same_model": differ == 0.0}
    ddp.each(lambda: ddp.main() and write_outputs(run, m, probs))
    print(f"\n== test split ({len(probs)} images, {stages[-1].size} px)\n" + format_metrics(m))
    print(f"\nrun folder: {run.dir} (report.md); seconds: " +
          ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    ddp.close()
    return m


if __name__ == "__main__":  # record: under torchrun, a failing rank's error is reported whole
    record(data.run_cli)(main, parse_args(doc=__doc__))
