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
import dataclasses
import json
import os
import random
import subprocess
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import devices
import films
from batches import Augment, Batches
from checkpoint import (Checkpointer, check_writable, load_optimizer, resume_from,
                        save_checkpoint, set_rng_state)
from config import Config, make_stages, parse_args
from lrfind import lr_find, save_lr_find
from metrics import classification_metrics, format_metrics
from model import build_model, class_logits, layer_groups, set_body_frozen
from report import stage_table, write_predictions, write_report
from schedule import ONE_CYCLE, discriminative_lrs


@dataclass
class Run:
    """What setup() makes once and every phase uses."""
    cfg: Config
    dir: str
    device: torch.device
    amp: object  # autocast dtype (torch.bfloat16) or None: fp32 (devices.precision)
    channels_last: bool
    classes: list
    items: dict  # "train", "val", "test" -> data.Items
    films: dict  # "train", "val", "test" -> films.Films (uint8 films per size, shapes), CPU
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: object  # step(x, y) -> loss: forward, backward, optimizer step
    forward: object  # the model, or its compiled version: chosen per stage
    compiled: object  # torch.compile(model), made when a stage first asks for it
    aug: object
    loss_weight: torch.Tensor = None
    ckpt: object = None  # checkpoint.Checkpointer: snapshots, last.pt
    timings: dict = field(default_factory=dict)  # seconds spent per kind of work
    history: list = field(default_factory=list)  # one dict per epoch, as in metrics.jsonl


BETAS = (0.9, 0.99)  # fastai's Adam: beta1 0.9 (the one-cycle moves it), beta2 0.99


def make_step(run):
    """One training step, on either device: bf16 autocast where --precision says (bf16's range
    is fp32's, so no GradScaler), the head and the loss in fp32. No host sync: the loss stays
    on the device."""
    opt = run.opt

    def step(x, y):
        with devices.autocast(run.device, run.amp):
            loss = F.cross_entropy(run.forward(x), y, weight=run.loss_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def setup(cfg, sizes=None):
    """Read and decode the data (at `sizes`, default the stages'), build model and optimizer,
    and make the run folder."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = devices.pick_device(cfg.device)
    amp, cl = devices.precision(dev, cfg.precision), devices.channels_last(dev, cfg.channels_last)
    print("config: " + json.dumps(dataclasses.asdict(cfg)))
    problems = data.Problems()  # all that is wrong with the data, said once, before training
    classes, splits = data.load_dataset(
        cfg.data, cfg.train_split, cfg.test_split, cfg.image_dir, cfg.subtypes, cfg.phantoms,
        cfg.seed, cfg.allow_patient_overlap, cfg.allow_missing_class, problems)
    # Decode once, at every stage size in one pass; val is carved from the decoded train set
    sizes = sizes or [s.size for s in make_stages(cfg)]
    cache = cfg.cache_dir or None
    full = films.load_pixels(splits["train"], sizes, cache, cfg.resize, problems=problems)
    test = films.load_pixels(splits["test"], sizes, cache, cfg.resize, problems=problems)
    problems.check()
    tr, va = data.split_patients(splits["train"], cfg.val_frac, cfg.seed)
    items = {"train": splits["train"].subset(tr), "val": splits["train"].subset(va),
             "test": splits["test"]}
    for k, it in items.items():
        counts = np.bincount(it.labels, minlength=len(classes))
        print(f"{k:>5}: {len(it):5d} images, " +
              ", ".join(f"{c} {n}" for c, n in zip(classes, counts)))
    split_films = {"train": full.subset(tr), "val": full.subset(va), "test": test}

    model = build_model(len(classes), cfg.weights, cfg.arch).to(dev)
    # The run folder comes last: a run that cannot start leaves none behind
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S-") + os.path.basename(
        os.path.normpath(cfg.data))
    run_dir = os.path.join(cfg.runs, name)
    # fp32 weights in each stage checkpoint and model.pt; last.pt adds Adam's two moments
    check_writable(run_dir, need_bytes=(len(make_stages(cfg)) + 4) * 4 * sum(
        p.numel() for p in model.parameters()))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "git_commit": git_commit(),
                   "torch": torch.__version__, "device": str(dev)}, f, indent=1)
    with open(os.path.join(run_dir, "classes.json"), "w") as f:
        json.dump(classes, f)

    if cl:  # NHWC lets the tensor cores run convolutions without transposes
        model = model.to(memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are static within a stage
    groups = layer_groups(model)
    # fastai's Adam: decoupled weight decay (true_wd); one param group per layer group
    opt = devices.adamw([{"params": ps, "name": n} for n, ps in groups.items()],
                        lr=1e-3, betas=BETAS, weight_decay=cfg.wd)
    if cfg.compile != "off":  # one static graph per stage size x (frozen, unfrozen, eval)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    weight = None
    if cfg.class_weights:  # inverse frequency, mean weight 1
        counts = torch.bincount(torch.tensor(items["train"].labels), minlength=len(classes))
        weight = (counts.sum() / (len(classes) * counts.clamp(min=1).float())).to(dev)
    aug = Augment(cfg.rotate, cfg.zoom, cfg.warp, cfg.lighting, cfg.p_affine, cfg.p_lighting,
                  cfg.flip) if cfg.aug else None
    print(f"device {devices.describe(dev)}: {'bf16 autocast' if amp else 'fp32'}, "
          f"{'channels_last' if cl else 'NCHW'}, {'fused' if opt.defaults.get('fused') else 'for-each'} "
          f"AdamW, compile {cfg.compile}; run folder {run_dir}")
    run = Run(cfg, run_dir, dev, amp, cl, classes, items, split_films, model, opt, None, model,
              None, aug, weight)
    run.step = make_step(run)
    run.ckpt = Checkpointer(run, os.path.join(run_dir, "last.pt"), cfg.save_every)
    return run


def use_compile(run, stage):
    """Pick the compiled or the eager model for this stage (see devices.compile_pays)."""
    c = run.cfg.compile
    images = (stage.frozen_epochs + stage.unfrozen_epochs) * len(run.items["train"])
    on = c == "on" or (c == "auto" and run.device.type == "cuda"
                       and devices.compile_pays(images, stage.size))
    if on and run.compiled is None:  # compiles lazily, at the first call per shape
        run.compiled = torch.compile(run.model, dynamic=False,
                                     backend=run.cfg.compile_backend)
    run.forward = run.compiled if on else run.model
    return on


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def stage_tensors(run, size):
    """{split: (uint8 films, labels, height/width or None)} at this stage's size, moved to
    the device once. The films' shapes matter only to --resize crop."""
    crop = run.cfg.resize == "crop"
    return {k: (f.images[size].to(run.device),
                torch.tensor(run.items[k].labels, device=run.device),
                f.hw.to(run.device) if crop else None) for k, f in run.films.items()}


def train_batches(run, tensors, size, batch_size, tag):
    """Shuffled, augmented training batches; each phase draws its own reproducible order."""
    images, labels, hw = tensors["train"]
    return Batches(images, labels, batch_size, size, aug=run.aug, hw=hw,
                   balance=run.cfg.balance, seed=run.cfg.seed + zlib.crc32(tag.encode()),
                   channels_last=run.channels_last)


def start_phase(run, frozen):
    """Freeze or unfreeze the body, and set the optimizer as fastai would at that call.

    --opt-reset fresh: a new Adam (fastai v1's freeze()/unfreeze() call create_opt: moments
    zero, step 0, beta1 back to 0.9, which is what the phase's LR finder runs with);
    moments: moments zero, beta1 where the last schedule left it (fastai v2's clear_state);
    none: one optimizer for the whole run, moments carried across phases and stages.
    """
    set_body_frozen(run.model, frozen)
    if run.cfg.opt_reset != "none":
        run.opt.state.clear()  # AdamW makes its state anew at the next step
    if run.cfg.opt_reset == "fresh":
        for g in run.opt.param_groups:
            g["betas"] = BETAS


def find_lr(run, tensors, size, batch_size, frozen, tag):
    """Run the LR range test for one phase; write lrfind_<tag>.csv/.png; return the LR."""
    set_body_frozen(run.model, frozen)
    batches = train_batches(run, tensors, size, batch_size, "lrfind_" + tag)
    c = run.cfg
    lrs, raw, smooth = lr_find(run.step, run.model, run.opt, batches, c.lr_find_steps,
                               c.lr_find_start, c.lr_find_end, c.lr_find_beta)
    return save_lr_find(os.path.join(run.dir, "lrfind_" + tag), lrs, raw, smooth, c.suggest,
                        c.lr_find_steps)


def resolve_lrs(run, tensors, size, batch_size, frozen, spec, tag):
    """Max LR per layer group from 'auto' | 'x' | 'lo:hi' (see schedule.discriminative_lrs)."""
    n = len(run.opt.param_groups)
    if spec == "auto":
        lr = find_lr(run, tensors, size, batch_size, frozen, tag)
        print(f"  LR finder ({run.cfg.suggest}): {lr:.2e}")
        # unfrozen: fastai's slice(lr), a tenth of it for the body
        return [lr] * n if frozen else discriminative_lrs(lr, n)
    if ":" in spec:
        lo, hi = spec.split(":")
        return discriminative_lrs((float(lo), float(hi)), n)
    return [float(spec)] * n


def predict(run, x, y, hw, size, batch_size=256):
    """(mean loss, accuracy, class probabilities (N, C) on the CPU) over (x, y), unaugmented."""
    logits = class_logits(run.model, run.forward, x, size, hw, batch_size, amp=run.amp,
                          channels_last=run.channels_last)
    n = max(1, len(y))
    loss = F.cross_entropy(logits, y, weight=run.loss_weight, reduction="sum").item() / n
    return loss, (logits.argmax(1) == y).float().sum().item() / n, logits.softmax(1).cpu()


def fit(run, tensors, size, batch_size, epochs, lrs, tag, log, where, start=0):
    """fastai's fit_one_cycle: `epochs` epochs, LR and beta1 of each group set by hand each step.

    A NaN or infinite loss ends the phase: model and optimizer go back to their state at the
    start of that epoch (run.ckpt's snapshot), and the step and LR where it happened are
    reported. After each epoch run.ckpt snapshots the state and writes last.pt in the
    background (where: the stage and phase); a resumed phase starts at epoch `start`.
    """
    c, sched, dev = run.cfg, ONE_CYCLE[run.cfg.one_cycle], run.device
    batches = train_batches(run, tensors, size, batch_size, tag)
    total, k, rows = epochs * len(batches), start * len(batches), []
    run.ckpt.take()  # what a first epoch that diverges goes back to
    for epoch in range(start, epochs):
        t0, loss_sum, shown = time.time(), torch.zeros((), device=dev), None
        devices.reset_peak(dev)
        first_bad = torch.full((), -1, device=dev)  # step of the first bad loss
        bar = tqdm(batches.epoch(epoch), desc=f"{tag} {epoch + 1}/{epochs}", leave=False)
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
        bad = int(first_bad.item())
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
               "img_s": len(batches) * batch_size / train_time, "time": time.time() - t0}
        if devices.peak_gib(dev) is not None:
            row["peak_gib"] = devices.peak_gib(dev)
        if bad >= 0:
            row.update(train_loss=float("nan"), diverged_at_step=bad + 1, diverged_lr=bad_lr)
        rows.append(row)
        run.history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        t1 = time.time()
        run.ckpt.take(**where, epoch=epoch + 1, phase_epochs=epochs, lrs=lrs,
                      history=run.history, timings=run.timings)
        run.ckpt.write()
        add_time(run, "checkpoint", time.time() - t1)
        print(f"{tag} epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, "
              f"val loss {val_loss:.4f}, val acc {100 * val_acc:.1f}%, "
              f"{row['img_s']:.0f} img/s, {row['time']:.1f}s")
        if bad >= 0:
            break
    return rows


def add_time(run, kind, seconds):
    run.timings[kind] = run.timings.get(kind, 0.0) + seconds


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
        note = set_rng_state(state["rng"], run.device)
        if note:
            print(f"note: {run.dir} was {note}; it is not bit for bit the uninterrupted run")
        run.history, run.timings = state["history"], state["timings"]
        done = {(r["stage"], r["phase_name"]) for r in run.history} - \
            {(state["stage"], state["phase_name"])}
        print(f"resuming {run.dir} after epoch {state['epoch']} of {state['phase_name']} "
              f"in stage {state['stage'] + 1}")
    with open(os.path.join(run.dir, "metrics.jsonl"), "w") as log:
        for row in run.history:  # what the interrupted run had logged
            log.write(json.dumps(row) + "\n")
        for i, st in enumerate(stages):
            if state and i < state["stage"]:
                continue
            print(f"\n== stage {i + 1}/{len(stages)}: {st.size} px, head {st.frozen_epochs} "
                  f"+ all layers {st.unfrozen_epochs} epochs, batch {st.batch_size}, "
                  f"compiled: {'yes' if use_compile(run, st) else 'no'}")
            tensors = stage_tensors(run, st.size)
            for phase, epochs, spec in [("frozen", st.frozen_epochs, st.lr_frozen),
                                        ("unfrozen", st.unfrozen_epochs, st.lr_unfrozen)]:
                if epochs == 0 or (i, phase) in done:
                    continue
                tag = f"s{i + 1}_{st.size}_{phase}"
                where = dict(stage=i, phase_name=phase)
                if state and (i, phase) == (state["stage"], state["phase_name"]):
                    set_body_frozen(run.model, phase == "frozen")  # optimizer as saved
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
            save_checkpoint(run, os.path.join(run.dir, f"stage{i + 1}_{st.size}.pt"),
                            stage=i + 1, size=st.size)
    save_checkpoint(run, os.path.join(run.dir, "model.pt"), size=stages[-1].size)
    run.ckpt.close()  # a last.pt write still going ends before the run reports
    run.timings["checkpoint_writes"] = run.ckpt.stats["write_s"]  # in the background

    # The test split, touched once: at the last stage's size, no augmentation
    t0 = time.time()
    _, _, probs = predict(run, *tensors["test"], stages[-1].size)
    add_time(run, "eval", time.time() - t0)
    m = classification_metrics(run.items["test"].labels, probs.argmax(1).tolist(), run.classes,
                               run.items["test"].sources, probs.tolist())
    m["timings_s"] = {**run.timings, "total": time.time() - t_start}
    with open(os.path.join(run.dir, "test_metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    write_predictions(os.path.join(run.dir, "test_predictions.csv"), run.items["test"],
                      run.items["test"].labels, probs.tolist(), run.classes)
    write_report(run.dir)
    print(f"\n== test split ({len(probs)} images, {stages[-1].size} px)\n" + format_metrics(m))
    print(f"\nrun folder: {run.dir} (report.md); seconds: " +
          ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    return m


if __name__ == "__main__":
    data.run_cli(main, parse_args(doc=__doc__))
