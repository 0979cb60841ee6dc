"""Checkpoints that survive crashes, and what it takes to resume a run bit for bit.

    save_checkpoint(run, path, **extra)   # atomic: temporary file, fsync, rename
    ck = Checkpointer(run, "last.pt")     # per epoch: ck.take(...) to host memory, ck.write()
    cfg, state = resume_from(cfg)         # the run folder's last.pt, for --resume
    restore(run, state)                   # its weights, optimizer, generators and history
    model, ck = load_checkpoint("runs/NAME")   # a trained model, for evaluate.py and predict.py
"""
import contextlib
import copy
import dataclasses
import math
import os
import random
import re
import threading
import time

import numpy as np
import torch
import torchvision

from machinery import ddp, runlock
from machinery.config import Config
from machinery.datasets import DataError
from model import COVIDResNet, load_weights


def save_checkpoint(run, path, state=None, **extra):
    """Weights, class names and config: loadable with torch.load(weights_only=True).

    state: a Checkpointer snapshot to save instead of the model's weights now. Atomic: written
    to a temporary file, flushed to disk, then renamed over `path`, so a crash leaves the
    previous checkpoint whole."""
    tmp = path + ".tmp"
    state = state or {"model": run.model.state_dict()}
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "classes": run.classes,
                        "config": dataclasses.asdict(run.cfg), **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: no half-written file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_stage(run, stage, size):
    """stage<N>_<size>.pt: a finished stage's weights (rank 0, ddp.on_main: the path is made
    there, as the other ranks have no run folder)."""
    save_checkpoint(run, os.path.join(run.dir, f"stage{stage}_{size}.pt"), stage=stage, size=size)


def save_model(run, size):
    """model.pt: the trained weights and the size they trained at, once a last.pt write still
    going has ended (rank 0, ddp.on_main: the other ranks write none)."""
    run.ckpt.close()
    save_checkpoint(run, os.path.join(run.dir, "model.pt"), size=size)


def rng_state(dev):
    """Every random generator training draws from, in a form torch.save(weights_only) keeps:
    the CPU's, numpy's, Python's and, when training on a GPU, that GPU's. Only that one:
    asking for every GPU's would start a CUDA context even in a CPU run."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(s, dev):
    """Restore rng_state() for a run on `dev`; returns a note when it cannot all be restored.

    s["cuda"]: one state, None (a CPU run), or, in checkpoints from before 2026-11-27, a list
    with one state per GPU the saving machine had. A GPU's state (a seed and an offset) fits
    any GPU; the run's own GPU's is taken, the first if that machine had fewer. A run moved
    between a GPU and the CPU goes on from the same weights and seeds, but that device's
    generators draw other numbers (batches, augmentation, dropout)."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    cuda, gpu = s["cuda"], dev.type == "cuda"
    if isinstance(cuda, (list, tuple)):  # one per GPU of the saving machine
        i = dev.index if gpu and dev.index is not None and dev.index < len(cuda) else 0
        cuda = cuda[i] if cuda else None
    if gpu != (cuda is not None):  # moved between a GPU and the CPU
        where = "the CPU, resumed on a GPU" if gpu else "a GPU, resumed on the CPU"
        return f"saved on {where}: its dropout draws start anew"
    if gpu:
        torch.cuda.set_rng_state(cuda, dev)
    return None


def load_optimizer(opt, state):
    """opt.load_state_dict(state), with each moment in its parameter's memory layout.

    load_state_dict moves a saved moment to the parameter's device and dtype but keeps its
    strides: a state saved in a run with NCHW weights (a CPU run) and loaded for channels_last
    ones (the same run resumed on a GPU) would then differ from its parameter's layout, which
    CUDA's fused AdamW refuses ("must have same dtype, device, and layout")."""
    opt.load_state_dict(state)
    for p, s in opt.state.items():
        for k, v in s.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                s[k] = torch.empty_like(p).copy_(v)


def _to_host(x, old, pin):
    """A copy of the nested state `x` in host memory, into old's tensors where they fit.

    Tensors keep their strides (channels_last weights copy as one block); on a GPU the
    copies go to pinned memory without waiting (record an event to know when they are done)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if not (isinstance(old, torch.Tensor) and old.shape == x.shape and
                old.dtype == x.dtype and old.stride() == x.stride()):
            old = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cpu",
                                      pin_memory=pin)
        return old.copy_(x, non_blocking=pin)
    if isinstance(x, dict):
        o = old if isinstance(old, dict) else {}
        return {k: _to_host(v, o.get(k), pin) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        o = old if isinstance(old, (list, tuple)) and len(old) == len(x) else [None] * len(x)
        return type(x)(_to_host(v, ov, pin) for v, ov in zip(x, o))
    return copy.deepcopy(x)


class Checkpointer:
    """The state training can go back to, and last.pt written from it in the background.

    take(**extra): model and optimizer state, every generator and `extra` copied to host
    memory, into buffers reused from epoch to epoch (on a GPU: pinned, copied without waiting).
    It is what a diverged epoch rolls back to (restore()) and what last.pt holds. write()
    hands the newest snapshot to a background thread that saves it atomically
    (save_checkpoint), unless that thread is still writing an older one, or began less than
    `every` seconds ago: then this epoch's state is not written, a later one is. A kill thus
    loses the work since the last finished write: at most one epoch when writes keep up.
    Two sets of buffers: a snapshot is never overwritten while it is being written."""

    def __init__(self, run, path, every=0.0):
        self.run, self.path, self.every = run, path, every
        self.pin = run.device.type == "cuda"
        self.bufs = [None, None]
        self.newest = self.writing = None  # indices into bufs
        self.thread, self.error, self.event = None, None, None
        self.last_start = -math.inf
        self.stats = dict(writes=0, write_s=0.0, skipped=0)  # train.py logs write_s

    def take(self, **extra):
        """Snapshot the run's state now (extra: the checkpoint's other entries)."""
        self._reap()
        # never the snapshot being written; else the newest stays whole until this one is
        keep = self.writing if self.writing is not None else self.newest
        i = 0 if keep is None else 1 - keep
        run, old = self.run, self.bufs[i] or {}
        self.bufs[i] = {"model": _to_host(run.model.state_dict(), old.get("model"), self.pin),
                        "opt": _to_host(run.opt.state_dict(), old.get("opt"), self.pin),
                        "rng": rng_state(run.device), **copy.deepcopy(extra)}
        self.newest = i
        if self.pin:  # the writer waits for the copies; training does not
            self.event = torch.cuda.Event()
            self.event.record()

    def restore(self):
        """Model and optimizer back to the newest snapshot."""
        if self.event is not None:  # the copies into the buffers are done
            self.event.synchronize()
        snap = self.bufs[self.newest]
        self.run.model.load_state_dict(snap["model"])
        # a copy: on the CPU the optimizer would otherwise keep the buffers as its own state
        load_optimizer(self.run.opt, _to_host(snap["opt"], None, False))

    def write(self):
        """Save the newest snapshot to `path` in the background; False when skipped (or
        when there is no path: the ranks but rank 0 under torchrun, which write nothing)."""
        if self.path is None:
            return False
        self._reap()
        if self.thread is not None or time.time() - self.last_start < self.every:
            self.stats["skipped"] += 1
            return False
        self.writing, self.last_start = self.newest, time.time()
        snap = self.bufs[self.newest]
        self.thread = threading.Thread(target=self._write, args=(snap, self.event),
                                       name="checkpoint-writer")
        self.thread.start()
        return True

    def _write(self, snap, event):
        try:
            t0 = time.time()
            if event is not None:
                event.synchronize()
            save_checkpoint(self.run, self.path, state=snap)
            self.stats["writes"] += 1
            self.stats["write_s"] += time.time() - t0
        except BaseException as e:  # raised in the training thread, at the next call
            self.error = e

    def _reap(self, wait=False):
        if self.thread is not None and (wait or not self.thread.is_alive()):
            self.thread.join()
            self.thread = self.writing = None
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def close(self):
        """Wait for a write in progress; raise what it raised."""
        self._reap(wait=True)


def drop_last(run_dir):
    """Remove a finished run's last.pt (weights and Adam's moments: 3x model.pt), which only
    --resume reads (--keep-last keeps it)."""
    with contextlib.suppress(FileNotFoundError):  # a run of no epochs never wrote one
        os.remove(os.path.join(run_dir, "last.pt"))


def resume_from(cfg):
    """(config, saved state) to continue the run folder cfg.resume from its last.pt."""
    runlock.refuse_if_held(cfg.resume, None)  # still training: before reading anything
    path = os.path.join(cfg.resume, "last.pt")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(cfg.resume, "test_metrics.json")):
            raise SystemExit(f"--resume {cfg.resume}: that run finished (its last.pt is removed "
                             "at the end, unless --keep-last); nothing to resume")
        raise SystemExit(f"--resume {cfg.resume}: no last.pt there (it is written after every "
                         "epoch); nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = Config(**state["config"])
        if not {"model", "opt", "history"} <= set(state):
            raise KeyError("no model, opt and history: not a last.pt")
    except Exception as e:  # truncated, bytes changed, not a last.pt
        stages = sorted(f for f in os.listdir(cfg.resume) if re.fullmatch(r"stage\d+_\d+\.pt", f))
        after = (f"; or train the stages after {stages[-1]} from its weights: python train.py "
                 f"--weights {os.path.join(cfg.resume, stages[-1])} --stages ... with the "
                 "remaining stages") if stages else ""
        raise SystemExit(f"--resume {cfg.resume}: {path} is damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}), so the "
                         f"run cannot go on from it. Start it again with --overwrite{after}") \
            from e
    # the same run folder, whatever name it was first given
    saved.runs, saved.name = os.path.split(os.path.normpath(cfg.resume))
    saved.resume = cfg.resume
    return saved, state


def restore(run, state):
    """Put a resumed run where last.pt left it: weights, optimizer (in the weights' layout,
    which may be new), every generator, the history and the timings. Says what cannot be
    restored exactly (another device, another number of ranks)."""
    run.model.load_state_dict(state["model"])
    load_optimizer(run.opt, state["opt"])
    same_world = state.get("ranks", 1) == ddp.world()
    note = set_rng_state(state["rng_ranks"][ddp.rank()] if same_world and
                         "rng_ranks" in state else state["rng"], run.device)
    if not same_world:
        ddp.seed_rank(run.cfg.seed + len(state["history"]))  # each rank its own dropout
        note = (f"{note}; " if note else "") + (
            f"saved by {state.get('ranks', 1)} process(es), resumed by {ddp.world()}: "
            "the global batch and the batches it draws change")
    if note:
        print(f"note: {run.dir} was {note}; it is not bit for bit the uninterrupted run")
    run.history, run.timings = state["history"], state["timings"]
    run.started -= run.timings.get("elapsed", 0.0)  # the time before the kill counts too
    print(f"resuming {run.dir} after epoch {state['epoch']} of {state['phase_name']} "
          f"in stage {state['stage'] + 1}")


class CheckpointError(DataError):
    """A file that is not one of our checkpoints (missing, damaged, another kind): the message
    names it. A DataError, so that the scripts end with the message alone (run_cli)."""


def run_dir_of(path):
    """The run folder of a run folder or of a checkpoint file in one ('' for a bare name)."""
    return path if os.path.isdir(path) else os.path.dirname(path)


def load_checkpoint(path, allow_unfinished=False):
    """One of our checkpoints -> (model, checkpoint dict), with a clear error for anything else.

    path may be a run folder (its model.pt is taken). Loads with weights_only=True: tensors,
    numbers and strings only, so a checkpoint from elsewhere cannot run code. A run still being
    written is refused, and so are the weights of an unfinished run (last.pt, or a folder with
    no model.pt yet) unless allow_unfinished: then ck["unfinished"] says where it stopped.
    """
    runlock.check_not_written(path)
    if os.path.isdir(path):
        last, path = os.path.join(path, "last.pt"), os.path.join(path, "model.pt")
        if not os.path.isfile(path) and os.path.isfile(last):  # an unfinished run (below)
            path = last
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint (give a run folder or a .pt file)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding arbitrary objects
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); is the file complete?") from e
    if not (isinstance(ck, dict) and {"model", "classes", "config"} <= set(ck)):
        raise CheckpointError(f"{path}: not a COVID-ResNet checkpoint (it needs model, classes "
                              "and config entries; train.py writes them)")
    if {"opt", "history"} <= set(ck):  # a last.pt: training's state after some epoch
        if "size" not in ck:  # last.pt before 2026-12-05: its stage's (0-based) size
            ck["size"] = int(str(ck["config"]["stages"]).split(",")[ck["stage"]])
        ck["unfinished"] = stopped_at(ck)
        model_pt = os.path.join(os.path.dirname(path), "model.pt")
        if not allow_unfinished:
            raise CheckpointError(
                f"{path}: the training state a finished run kept (--keep-last), not its model: "
                f"that is {model_pt}" if os.path.isfile(model_pt) else
                f"{path}: {which_weights(ck)}: not a finished model. Finish it with python "
                f"train.py --resume {run_dir_of(path) or '.'}, or take these weights anyway "
                "with --allow-unfinished (allow_unfinished=True from Python; the card says so)")
    ck["weights"] = which_weights(ck)
    model = COVIDResNet(getattr(torchvision.models, ck["config"]["arch"])(weights=None),
                        len(ck["classes"]))
    load_weights(model, ck["model"], path, ck["config"]["arch"])
    return model, ck


def which_weights(ck):
    """What a checkpoint's weights are when they are not its run's final model (model.pt), in
    words for a model card; "" when they are."""
    if ck.get("unfinished"):  # last.pt
        return f"the weights of an unfinished run, {ck['unfinished']}"
    if "val_loss" in ck:  # best.pt (--save-best)
        return (f"the weights of the lowest validation loss ({ck['val_loss']:.4f}, after epoch "
                f"{ck.get('epoch', '?')}), not the run's final model")
    if "stage" in ck:  # stageN_SIZE.pt
        return (f"the weights at the end of stage {ck['stage']} ({ck.get('size', '?')} px), "
                "not the run's final model")
    return ""


def stopped_at(ck):
    """Where a last.pt's run stopped, in words."""
    phase = {"frozen": "head-only", "unfrozen": "all-layers"}.get(ck.get("phase_name"), "?")
    return (f"stopped after epoch {ck.get('epoch', '?')} of {ck.get('phase_epochs', '?')} of "
            f"stage {ck.get('stage', 0) + 1}'s {phase} phase ({len(ck['history'])} epoch(s) "
            f"trained in all, at {ck['size']} px)")
