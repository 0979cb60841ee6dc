"""What a run is made of, for train.py and lrfind.py: the data read, checked, decoded and split
by patient, the model and its optimizer on the device, and the run folder.

    run = setup(cfg)                         # Run: config, device, data, model, optimizer, folder
    run.forward, run.infer = forwards(run, compiled=False)  # what a phase's steps call
    with timed(run, "lr_find"): ...          # seconds per kind of work, in test_metrics.json

Under torchrun every rank makes its own Run; rank 0 alone writes the run folder.
"""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from machinery import audit, datasets, ddp, devices, films, runlock
from machinery.checkpoint import Checkpointer
from machinery.config import Config, make_stages
from machinery.shortcuts import NOT_A_CLASSIFIER, Hidden
from model import build_model, fetch_weights, make_optimizer


@dataclass
class Run:
    """What setup() makes once and every phase uses."""
    cfg: Config
    dir: str  # the run folder; None on the ranks but rank 0 under torchrun (they write nothing)
    device: torch.device
    amp_dtype: torch.dtype  # the body's autocast dtype (torch.bfloat16), or None: fp32
    channels_last: bool
    classes: list
    items: dict  # "train", "val", "test" -> datasets.Items
    films: dict  # "train", "val", "test" -> films.Films (uint8 films per size, shapes), CPU
    model: nn.Module  # the weights: what is frozen, optimized, evaluated and saved
    opt: torch.optim.Optimizer
    forward: nn.Module = None  # what the training step calls this phase (forwards())
    infer: nn.Module = None  # what evaluation calls this phase: the model, or compiled
    loss_weight: torch.Tensor = None  # --class-weights, else None
    ckpt: Checkpointer = None  # snapshots and last.pt
    compiled: nn.Module = None  # torch.compile(model), made when a phase first asks for it
    compiled_for: tuple = None  # which parameters trained (requires_grad) when it was made
    started: float = 0.0  # time.time() when the run began, less the time before a resume
    timings: dict = field(default_factory=dict)  # seconds spent per kind of work
    history: list = field(default_factory=list)  # one dict per epoch, as in metrics.jsonl


def setup(cfg, sizes=None):
    """Read, check and decode the data (at `sizes`, default the stages'), hold out validation
    patients, build the model and its optimizer on the device, and make the run folder.

    Under torchrun every rank runs this; rank 0 alone checks and writes the run folder, and a
    node's first rank decodes the films into the cache while the node's other ranks wait."""
    dev_name = ddp.init(cfg.device, cfg.dist_timeout)  # torchrun: the process group
    with ddp.fail_together():  # before any work: a run already there is never written over
        run_dir = run_folder(cfg) if ddp.main() else None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = devices.pick_device(dev_name)
    amp, cl = devices.precision(dev, cfg.precision), devices.channels_last(dev, cfg.channels_last)
    arithmetic = devices.arithmetic(dev, amp)  # as precision() set TF32 for the process
    sd = fetch_weights(cfg.weights, cfg.arch)  # before any decoding: no weights, no wait
    stages = make_stages(cfg)
    classes, items, split_films, leaks = read_data(cfg, sizes or [s.size for s in stages])

    model = build_model(len(classes), cfg.weights, cfg.arch, cfg.ps, sd).to(dev)
    del sd
    ddp.seed_rank(cfg.seed)  # the same weights everywhere, each rank its own dropout
    if cfg.sync_bn:
        model = ddp.sync_batchnorm(model, dev)
    # The run folder comes last: a run that cannot start leaves none behind (and, with
    # --overwrite, the old run whole). fp32 weights in each stage checkpoint and model.pt;
    # last.pt adds Adam's two moments.
    need = (len(stages) + 4) * 4 * sum(p.numel() for p in model.parameters())
    with ddp.fail_together():
        if ddp.main():
            write_run_folder(cfg, run_dir, classes, dev, need, leaks, arithmetic)

    if cl:  # NHWC lets the tensor cores run convolutions without transposes
        model = model.to(memory_format=torch.channels_last)
    devices.cudnn_autotune(dev, cfg.cudnn_benchmark)  # one shape a stage: tuned once
    if cfg.compile != "off":  # one static graph per stage size x (frozen, unfrozen, eval)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    weight = None
    if cfg.class_weights:  # inverse frequency, mean weight 1
        counts = torch.bincount(torch.tensor(items["train"].labels), minlength=len(classes))
        weight = (counts.sum() / (len(classes) * counts.clamp(min=1).float())).to(dev)
    opt = make_optimizer(model, cfg.wd)
    bn = ", SyncBatchNorm" if cfg.sync_bn else ""
    ranks = (f", {ddp.world()} ranks ({torch.distributed.get_backend()}{bn})"
             if ddp.world() > 1 else "")
    print(f"device {devices.describe(dev)}: {arithmetic}, "
          f"{'channels_last' if cl else 'NCHW'}, "
          f"{'fused' if opt.defaults.get('fused') else 'for-each'} AdamW, compile "
          f"{cfg.compile}{ranks}; run folder {run_dir}")
    run = Run(cfg, run_dir, dev, amp, cl, classes, items, split_films, model, opt,
              forward=model, infer=model, loss_weight=weight)
    last = os.path.join(run_dir, "last.pt") if run_dir else None  # rank 0 alone writes
    run.ckpt = Checkpointer(run, last, cfg.save_every)
    return run


def read_data(cfg, sizes):
    """(classes, {split: Items}, {split: Films}, leaks): the data set read and checked, its
    films decoded once at every size in one pass, test (and validation) films duplicated in
    training found (leaks: audit.leaks' summary), and ~cfg.val_frac of the training patients
    held out for validation. Everything wrong with the data is said in one message, before any
    training."""
    problems = datasets.Problems()
    classes, splits = datasets.load_dataset(
        cfg.data, cfg.train_split, cfg.test_split, cfg.image_dir, cfg.subtypes, cfg.phantoms,
        cfg.phantom_seed, cfg.allow_patient_overlap, cfg.allow_missing_class, problems,
        cfg.test_sources)
    cache = cfg.cache_dir or None
    if cache is None and ddp.world() > 1 and splits["train"].pixels is None:
        cache = ddp.node_cache_dir()  # decoded once per node all the same
        print(f"--cache-dir '': the node's ranks share the films through {cache} (kept)")
    hidden = Hidden(cfg.hide, cfg.hide_box, cfg.resize == "crop")
    with ddp.node_first():  # its first rank decodes into the cache, the others read it
        full, test = (films.load_pixels(splits[k], sizes, cache, cfg.resize, problems=problems,
                                        hidden=hidden) for k in ("train", "test"))
        leaks = th = None
        # the audit's cheap part: test films also in training (audit.py). Not for phantoms
        # (in memory, or as files of source 'phantom': bench.py's): each is drawn from its own
        # seed, and their smooth shapes, without a radiograph's detail, all look alike to it
        if not problems and set(splits["train"].sources) != {"phantom"}:
            small = min([s for s in sizes if s >= audit.THUMB] or [max(sizes)])
            whole = (full, test)
            if hidden:  # blacked-out films all look alike to it: the whole films
                whole = [films.load_pixels(splits[k], [small], cache, cfg.resize)
                         for k in ("train", "test")]
            th = audit.thumbs(whole[0].images[small])
            leaks = audit.leaks(th, audit.thumbs(whole[1].images[small]), splits["train"],
                                splits["test"], cfg.allow_duplicates, problems, classes)
        problems.check()
    tr, va = datasets.split_patients(splits["train"], cfg.val_frac, cfg.seed)
    if th is not None:  # validation films copied in training: a warning (audit.val_leaks)
        leaks.update(audit.val_leaks(th, tr, va, splits["train"]))
    items = {"train": splits["train"].subset(tr), "val": splits["train"].subset(va),
             "test": splits["test"]}
    for k, it in items.items():
        counts = np.bincount(it.labels, minlength=len(classes))
        print(f"{k:>5}: {len(it):5d} images, " +
              ", ".join(f"{c} {n}" for c, n in zip(classes, counts)))
    if cfg.test_sources:
        print(f"test split: the films of {cfg.test_sources} (held out: training has none of "
              "their films)")
    if hidden:
        print(f"SHORTCUT TEST: trained and tested on {hidden.note()}: {NOT_A_CLASSIFIER}")
    return classes, items, {"train": full.subset(tr), "val": full.subset(va), "test": test}, leaks


def forwards(run, compiled):
    """(what the training step calls, what evaluation calls) for a phase: the model itself, or
    torch.compile's version of it (compiled lazily at the first call per shape); the step's
    in DistributedDataParallel under torchrun. Choose them after freezing or unfreezing: DDP
    registers the parameters that train when it is made, and so do the compiled graphs.

    torch.compile's caches start anew wherever the parameters that train change (frozen <->
    unfrozen): torch 2.11's guards do not check requires_grad, so a graph traced with the body
    frozen was reused after unfreezing and the body never got a gradient, without a word
    (torch 2.14's guards see it). The cost: nothing more than torch 2.14 compiles anyway; it
    too recompiles both graphs (training, evaluation) after the change: 4 for a stage's two
    phases, counted on the CPU, before and after (on torch 2.11, 2 before: the wrong ones)."""
    net = run.model
    if compiled:
        trains = tuple(p.requires_grad for p in run.model.parameters())
        if run.compiled is None or run.compiled_for != trains:
            torch.compiler.reset()  # every graph, guard and cached frame of this process
            run.compiled = torch.compile(run.model, dynamic=False,
                                         backend=run.cfg.compile_backend)
            run.compiled_for = trains
        net = run.compiled
    return ddp.wrap(net, run.device), net


def compile_stage(cfg, device, stage, n_train):
    """Whether --compile compiles this stage: on, off, or auto: on CUDA where compiling repays
    itself (devices.compile_pays) for the stage's epochs over n_train films."""
    images = (stage.frozen_epochs + stage.unfrozen_epochs) * n_train
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"
                                   and devices.compile_pays(images, stage.size))


def write_run_folder(cfg, run_dir, classes, dev, need_bytes, leaks, arithmetic):
    """Make the run folder (rank 0): check it can take the run, replace an old run there with
    --overwrite, write config.json (with the torch, device and arithmetic that ran),
    classes.json and leaks.json (test films duplicated in training, audit.leaks)."""
    check_writable(run_dir, need_bytes)
    runlock.hold(run_dir)  # this process's alone until the run is whole (or the process ends)
    refuse_run_there(cfg, run_dir)  # one made by another process since run_folder() looked
    if cfg.overwrite and not cfg.resume and os.path.isfile(os.path.join(run_dir, "config.json")):
        for entry in os.listdir(run_dir):  # a run folder (config.json), and only now
            path = os.path.join(run_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif entry != runlock.LOCK:
                os.remove(path)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "git_commit": git_commit(), "git_dirty": git_dirty(),
                   "torch": torch.__version__, "device": str(dev), "arithmetic": arithmetic,
                   **({"ranks": ddp.world()} if ddp.world() > 1 else {})}, f, indent=1)
    print(f"config: {f.name} (every knob, not in this log; run it again: --config that file)")
    with open(os.path.join(run_dir, "classes.json"), "w") as f:
        json.dump(classes, f)
    if leaks is not None:
        with open(os.path.join(run_dir, "leaks.json"), "w") as f:
            json.dump(leaks, f, indent=1)


def check_writable(run_dir, need_bytes):
    """Fail now, not at the first checkpoint hours later, if run_dir cannot take the run."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")  # two may look at once
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"cannot write the run folder {run_dir} ({e.strerror}); choose "
                         "another with --runs DIR") from e
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        if not os.listdir(run_dir):
            os.rmdir(run_dir)
        raise SystemExit(f"{run_dir} has {free / 2**20:.0f} MiB free; the run's checkpoints "
                         f"need about {need_bytes / 2**20:.0f} MiB. Free space or use --runs DIR")


def run_folder(cfg):
    """--runs/--name (default name: date-time and data set). A folder that holds a run
    (config.json) is refused unless this is its --resume, or --overwrite replaces it."""
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S-") + os.path.basename(
        os.path.normpath(cfg.data))
    run_dir = os.path.join(cfg.runs, name)
    runlock.refuse_if_held(run_dir)  # another process trains there: stop before any work
    refuse_run_there(cfg, run_dir)
    return run_dir


def refuse_run_there(cfg, run_dir):
    """A folder that holds a run (config.json) is this run's only to --resume or --overwrite."""
    held = os.path.isfile(os.path.join(run_dir, "config.json"))
    if held and not (cfg.resume or cfg.overwrite):
        raise SystemExit(f"{run_dir} already holds a run; continue it with --resume "
                         f"{run_dir}, replace it with --overwrite, or choose another --name")


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def git_dirty():
    """Whether the code that ran differs from its git commit (uncommitted changes), or None
    when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def add_time(run, kind, seconds):
    run.timings[kind] = run.timings.get(kind, 0.0) + seconds


@contextmanager
def timed(run, kind):
    """The block's wall-clock seconds, added to run.timings[kind]."""
    t0 = time.time()
    yield
    add_time(run, kind, time.time() - t0)
