"""The measurements behind bench.py and its GPU check, one function each, on one device.

    bc = BenchConfig(sizes="128,224,229")          # the knobs (bench.py makes them flags)
    res = Results("bench.json", env)               # merged across calls, saved as it goes
    recipe = Recipe(train.main, batches)           # what is timed of the tutorial files
    measure_steps(bc, dev, res, "loop", recipe)    # (a) ceiling and (b) real loop per stage/phase
    checkpoint_cost(step_run(bc, dev, 64))         # one epoch's snapshot and last.pt write
    end_to_end(bc, dev, "5310:639", recipe); cache_rate(bc)
"""
import atexit
import collections
import copy
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from machinery import datasets, devices, films, phantom
from machinery.checkpoint import Checkpointer, save_checkpoint
from machinery.config import Config
from machinery.flags import knob
from machinery.run import forwards, setup
from model import set_body_frozen, train_step
from schedule import PAPER

PARTS = ("ceiling", "loop", "checkpoint", "e2e", "cache")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project
_SCRATCH = []


def scratch():
    """A new empty folder inside this process's scratch folder. The measurements write runs,
    caches and PNGs (GBs for the GPU check) that nobody reads afterwards: bench.main removes
    the scratch folder when it returns (remove_scratch), and the process's exit does in any
    case, so that a benchmark never fills the disk it runs on."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="covid-resnet-bench-"))
        atexit.register(remove_scratch)
    return tempfile.mkdtemp(dir=_SCRATCH[0])


def remove_scratch():
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


def _save_png(args):
    pixels, path, size = args
    Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(path, compress_level=1)


def write_phantom_covidx(root, n_train, n_test, size=1024, seed=0):
    """Write phantoms as a COVIDx folder (train/, test/, train.txt, test.txt) of 8-bit PNGs
    at `size` px: real files, for timing decoding and caching (bench.py)."""
    jobs = []
    for k, (split, n) in enumerate([("train", n_train), ("test", n_test)]):
        labels, patients, pixels = phantom.make_split(n, [seed, k], f"phantom-{split}-")
        os.makedirs(os.path.join(root, split), exist_ok=True)
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            for i, (c, p) in enumerate(zip(labels, patients)):
                name = f"{split}-{i:06d}.png"
                f.write(f"{p} {name} {phantom.CLASSES[c]} phantom\n")
                jobs.append((pixels[i], os.path.join(root, split, name), size))
    bar = dict(total=len(jobs), desc=f"writing {len(jobs)} PNGs at {size} px", leave=False,
               disable=None)
    if len(jobs) * size * size < 2 ** 24:  # a few MB of pixels: quicker than starting a pool
        list(tqdm(map(_save_png, jobs), **bar))
        return
    with films.process_pool() as pool:
        list(tqdm(pool.map(_save_png, jobs, chunksize=16), **bar))


@dataclass
class Recipe:
    """What the measurements time of the tutorial files (bench.py hands them in: the package
    never imports train.py or data.py): train.py's main(cfg), and a stage's training batches,
    batches(run, size, batch_size) -> data.Batches."""
    train_main: object
    batches: object


@dataclass
class BenchConfig:
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    part: str = knob(",".join(PARTS), "parts to run, comma separated: " + ", ".join(PARTS))
    gpu_check: bool = knob(False, "run the first-GPU check (train, resume, evaluate, predict, "
                           "ratios, memory, checkpoint cost) instead of the parts")
    budget: float = knob(520.0, "--gpu-check: seconds it may take; a step that would not fit "
                         "in what is left is skipped (its time limit is what is left). 520: "
                         "every step, in one device command of at most 600 s, which with a "
                         "machine's start (2-4 min) fits in 15 minutes")
    only: str = knob("", "--gpu-check: only these steps, comma separated (a second call for "
                     "what the first skipped or failed) (default: every step)", metavar="STEPS")
    # train.py's defaults (the paper's stages and batch among them)
    sizes: str = knob(Config.stages, "stage sizes")
    batch_size: int = knob(PAPER.stages[0].batch_size, "batch size, as training uses it")
    arch: str = knob(Config.arch, "ResNet body")
    precision: str = knob(Config.precision, "auto | bf16 | fp32 | tf32 (as train.py)")
    channels_last: str = knob(Config.channels_last, "auto | on | off (as train.py)")
    cudnn_benchmark: str = knob(Config.cudnn_benchmark, "on | off | N: cuDNN autotuning (as "
                                "train.py)", metavar="on|off|N")
    modes: str = knob("eager,compiled", "ceiling and loop: eager, compiled, or both")
    compile_backend: str = knob(Config.compile_backend, "torch.compile backend (as train.py)")
    steps: int = knob(25, "timed steps per measurement")
    warmup: int = knob(5, "untimed steps before each measurement")
    e2e_sets: str = knob("5310:639", "train:test sizes of the end-to-end runs, comma separated")
    png_size: int = knob(1024, "size of the phantom PNGs written for e2e and cache")
    cache_images: int = knob(512, "PNGs decoded for the cache build rate")
    ddp: int = knob(0, "instead of the parts: data-parallel scaling, train.py under torchrun on "
                    "N GPUs (gloo processes on the CPU) against 1, as a user runs it "
                    "(validation, last.pt every epoch): images/s per rank, and where the N "
                    "ranks' epochs went")
    ddp_steps: int = knob(20, "--ddp: steps per epoch of the N-rank run (3 epochs, the first "
                          "not timed)")
    out: str = knob("", "JSON results, merged across calls (default: bench.json, or "
                    "gpu_check.json with --gpu-check, whose scripts' output goes to the same "
                    "name with .log)")
    quick: bool = knob(False, "tiny sizes on the CPU, seconds: a check that the script works")


QUICK = dict(device="cpu", sizes="32,40", batch_size=8, arch="resnet18", steps=2, warmup=1,
             modes="eager", e2e_sets="32:16", png_size=96, cache_images=16, ddp_steps=4,
             budget=1800)  # --gpu-check --quick: every step, however slow the CPU


class Results:
    """The JSON file: read at the start (results of other calls on the same device and torch
    are kept), written again after every measurement."""

    def __init__(self, path, env):
        self.path, self.r = path, {"env": env}
        if os.path.isfile(path):
            old = json.load(open(path))
            was, now = ({**e, **e.get("config", {})} for e in (old.get("env", {}), env))
            # the device, torch and the knobs the rows depend on
            keys = ("device", "torch", "arch", "batch_size", "precision", "channels_last")
            if all(was.get(k) == now.get(k) for k in keys):
                self.r = {**old, "env": env}
            else:
                print(f"{path} holds results of another device, torch or --arch, --batch-size, "
                      "--precision, --channels-last; starting it anew")

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.r, f, indent=1)
        os.replace(tmp, self.path)

    def add_row(self, part, row, key=("size", "phase", "mode")):
        """Add or replace the row of `part` with the same key."""
        rows = [r for r in self.r.get(part, []) if any(r.get(k) != row.get(k) for k in key)]
        self.r[part] = rows + [row]
        self.save()

    def set(self, part, value):
        self.r[part] = value
        self.save()


def img_s(run, bc, fn):
    """Images per second of fn, a training step of bc.batch_size films: bc.warmup calls
    untimed, then bc.steps timed, the device drained before and after."""
    for _ in range(bc.warmup):
        fn()
    devices.sync(run.device)
    t0 = time.time()
    for _ in range(bc.steps):
        fn()
    devices.sync(run.device)
    return bc.batch_size / ((time.time() - t0) / bc.steps)


def step_run(bc, dev, n_train=None):
    """A setup() run on in-memory phantoms, for the step measurements."""
    n_train = n_train or max(bc.batch_size * (bc.steps + bc.warmup), 64)
    cfg = Config(data="phantom", phantoms=n_train, arch=bc.arch, weights="none",
                 device=str(dev), stages=bc.sizes, frozen_epochs="0", unfrozen_epochs="1",
                 batch_size=str(bc.batch_size), runs=scratch(), cache_dir="",
                 compile="off", precision=bc.precision, channels_last=bc.channels_last,
                 compile_backend=bc.compile_backend, cudnn_benchmark=bc.cudnn_benchmark)
    return setup(cfg)


def step(run, x, y):
    """The training step, as train.py takes it."""
    return train_step(run.forward, run.opt, x, y, run.amp_dtype, run.loss_weight)


def ceiling(run, bc, size):
    """(a): img/s of the step on one synthetic batch already on the device."""
    cl = torch.channels_last if run.channels_last else torch.contiguous_format
    x = torch.randn(bc.batch_size, 3, size, size, device=run.device).contiguous(memory_format=cl)
    y = torch.randint(0, len(run.classes), (bc.batch_size,), device=run.device)
    return img_s(run, bc, lambda: step(run, x, y))


def real_loop(run, bc, size, recipe):
    """(b): img/s of the step on the training loop's own batches, new epochs as needed."""
    batches = recipe.batches(run, size, bc.batch_size)
    # batch after batch, epoch after epoch (each a new order, as in training; data.Batches
    # refuses fewer films than a batch, so each epoch gives one)
    it = (xy for epoch in itertools.count() for xy in batches.epoch(epoch))
    return img_s(run, bc, lambda: step(run, *next(it)))


def measure_steps(bc, dev, res, part, recipe):
    """ceiling or loop: one row per size x phase x mode, saved as it is measured."""
    run = step_run(bc, dev)
    for mode in bc.modes.split(","):
        for size in [int(s) for s in bc.sizes.split(",")]:
            for phase in ("frozen", "unfrozen"):
                set_body_frozen(run.model, phase == "frozen")
                run.forward, run.infer = forwards(run, mode == "compiled")
                devices.reset_peak(dev)
                before = body_convs(run.model)
                t0 = time.time()
                row = {"size": size, "phase": phase, "mode": mode, "batch": bc.batch_size,
                       "ceiling": ceiling(run, bc, size)}
                if part == "loop":
                    row["real"] = real_loop(run, bc, size, recipe)
                    row["ratio"] = row["real"] / row["ceiling"]
                row["peak_gib"] = devices.peak_gib(dev)
                row["peak_reserved_gib"] = devices.peak_gib(dev, reserved=True)
                row["wall_s"] = time.time() - t0  # includes autotuning and compilation
                # the share of the body's convolutions the steps moved: 0 frozen, 1 unfrozen
                row["body_moved"] = sum(not torch.equal(a, b) for a, b in zip(
                    before, body_convs(run.model))) / len(before)
                real = (f", real {row['real']:,.0f} img/s, (b)/(a) {row['ratio']:.3f}"
                        if part == "loop" else " img/s")
                print(f"  {part} {size} px {phase:>8} {mode:>8}: ceiling {row['ceiling']:,.0f}"
                      f"{real} ({row['wall_s']:.0f} s)")
                res.add_row(part, row)


def body_convs(model):
    """Copies of the body's convolution weights (on the device: ~100 MB for ResNet-50)."""
    return [m.weight.detach().clone() for m in model.body.modules()
            if isinstance(m, torch.nn.Conv2d)]


def checkpoint_cost(run):
    """One epoch's checkpoint work for run's model with a full Adam state: the snapshot
    (training waits for it: the copies are queued; on a GPU they finish in the background)
    and the last.pt write (in a background thread), against train.py before 2026-11-27:
    model and optimizer deep-copied on the device, then a synchronous save with fsync."""
    x = torch.randn(2, 3, 64, 64, device=run.device)
    set_body_frozen(run.model, False)
    step(run, x, torch.zeros(2, dtype=torch.long, device=run.device))  # Adam's moments exist
    dev, path = run.device, os.path.join(run.dir, "last.pt")
    ck = Checkpointer(run, path)
    out = {"snapshot_s": [], "snapshot_done_s": [], "write_s": [], "before_s": []}
    for i in range(3):  # the best of 3 is kept
        devices.sync(dev)
        t0 = time.time()
        ck.take(epoch=i)
        out["snapshot_s"].append(time.time() - t0)
        devices.sync(dev)
        out["snapshot_done_s"].append(time.time() - t0)
        t0 = time.time()
        ck.write()
        ck.close()
        out["write_s"].append(time.time() - t0)
        t0 = time.time()  # the old way
        good = copy.deepcopy(run.model.state_dict()), copy.deepcopy(run.opt.state_dict())
        save_checkpoint(run, path + ".old", opt=run.opt.state_dict(), epoch=i)
        devices.sync(dev)
        out["before_s"].append(time.time() - t0)
        del good
    r = {k: min(v) for k, v in out.items()}
    r["mib"] = os.path.getsize(path) / 2 ** 20
    print(f"  checkpoint ({r['mib']:.0f} MiB): snapshot {r['snapshot_s'] * 1e3:.0f} ms "
          f"(done after {r['snapshot_done_s'] * 1e3:.0f} ms), write {r['write_s']:.2f} s in "
          f"the background; before: {r['before_s']:.2f} s in the training thread")
    return r


def end_to_end(bc, dev, spec, recipe):
    """(c): train.py's default schedule on phantom PNGs, spec "train:test" of them (written
    first, timed), from a cold and then a warm cache."""
    n_train, n_test = (int(v) for v in spec.split(":"))
    root, cache, t0 = scratch(), scratch(), time.time()
    write_phantom_covidx(root, n_train, n_test, bc.png_size)
    out = {"write_pngs_s": time.time() - t0}
    for cache_state in ("cold", "warm"):
        cfg = Config(data=root, weights="none", arch=bc.arch, device=str(dev),
                     stages=bc.sizes, batch_size=str(bc.batch_size), cache_dir=cache,
                     runs=scratch(), name=cache_state, precision=bc.precision,
                     channels_last=bc.channels_last, compile_backend=bc.compile_backend)
        if bc.quick:  # one epoch per stage, short LR sweeps
            cfg.frozen_epochs, cfg.unfrozen_epochs, cfg.lr_find_steps = "1", "1", 4
        m = recipe.train_main(cfg)
        out[cache_state] = {**m["timings_s"], "accuracy": m["accuracy"]["value"]}
    return out


def ddp_scaling(bc, dev, n, log):
    """train.py on 1 process and under torchrun on n, as a user runs it (validation and a
    last.pt every epoch, the defaults), at the first stage size: phantoms held on the device,
    fixed LRs (no finder), 3 epochs of which the last 2 count. Every rank has bc.batch_size
    per step (the global batch is n times larger) and the same films per step either way.

    Images/s are the steps' (train.py's img_s: validation and the checkpoint come after an
    epoch's steps); efficiency = n-rank images/s / (n x 1-process images/s). "as_run": where
    the n ranks' epochs went, steps, validation and checkpoint (epoch_split)."""
    size = int(bc.sizes.split(",")[0])
    films = bc.batch_size * n * bc.ddp_steps  # training films: ddp_steps steps of n ranks
    held_out = Config().val_frac  # of the patients (one or two films): ~as many to train
    args = ["--data", "phantom", "--phantoms", str(math.ceil(films / (1 - held_out))),
            "--arch", bc.arch, "--weights", "none", "--stages", str(size),
            "--frozen-epochs", "0", "--unfrozen-epochs", "3", "--lr-unfrozen", "1e-3",
            "--batch-size", str(bc.batch_size), "--device", dev.type, "--precision",
            bc.precision, "--channels-last", bc.channels_last,
            "--compile", "off", "--data-on", "gpu", "--runs", scratch()]
    split = {k: epoch_split(train_py(k, [*args, "--name", f"ranks{k}"], log), bc.batch_size, k)
             for k in (1, n)}
    out = {"size": size, "batch_per_rank": bc.batch_size, "ranks": n,
           **{f"img_s_{k}": e["img_s_steps"] for k, e in split.items()}}  # all ranks' images
    out["img_s_per_rank"] = out[f"img_s_{n}"] / n
    out["efficiency"] = out["img_s_per_rank"] / out["img_s_1"]
    print(f"  {n} ranks: {out[f'img_s_{n}']:,.0f} img/s ({out['img_s_per_rank']:,.0f} per rank)"
          f" vs 1: {out['img_s_1']:,.0f} img/s; scaling efficiency {out['efficiency']:.2f}")
    e = out["as_run"] = split[n]
    print(f"  {n} ranks as run: {e['epoch_s']:.2f} s an epoch: steps {e['train_s']:.2f}, "
          f"validation {e['val_s']:.2f}, checkpoint {e['checkpoint_s']:.2f}; "
          f"{e['img_s']:,.0f} img/s (steps alone {e['img_s_steps']:,.0f})")
    return out


def train_py(k, args, log):
    """Run train.py with args on k processes (k > 1: under torchrun), its output appended to
    log; its run folder."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}"]
    cmd = [sys.executable, *(launcher if k > 1 else []), os.path.join(ROOT, "train.py"), *args]
    with open(log, "a") as f:
        f.write(f"\n===== {k} rank(s): {' '.join(cmd)}\n")
        f.flush()
        threads = os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // k)))
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": threads,
                                "TMPDIR": scratch()})  # torchrun's logs in the scratch
    if p.returncode:
        raise RuntimeError(f"train.py on {k} rank(s) failed (exit {p.returncode}); see {log}")
    return os.path.join(args[args.index("--runs") + 1], args[args.index("--name") + 1])


def metrics_rows(run_dir):
    """metrics.jsonl of a run folder: one dict an epoch."""
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def epoch_split(run_dir, batch, ranks):
    """Where a finished run's epochs went, in seconds per epoch (the first aside: it warms
    up), from what train.py wrote: metrics.jsonl's time (the steps and validation) and img_s
    (the steps), steps.csv's steps per epoch, and test_metrics.json's timings_s, whose
    checkpoint (the snapshot, last.pt's write started, every rank's generators gathered) is
    the sum over all epochs. img_s: the epoch's films per second of all three."""
    every = metrics_rows(run_dir)
    rows = every[1:]
    with open(os.path.join(run_dir, "steps.csv")) as f:  # epoch,step,loss; epoch: row number
        steps = collections.Counter(int(line.split(",")[0]) for line in f.readlines()[1:])
    t = json.load(open(os.path.join(run_dir, "test_metrics.json")))["timings_s"]
    films = [steps[i] * batch * ranks for i in range(2, len(every) + 1)]  # each epoch's
    train = [f / r["img_s"] for f, r in zip(films, rows)]  # img_s: films / the steps' time
    out = {"train_s": sum(train) / len(rows),
           "val_s": sum(r["time"] - s for r, s in zip(rows, train)) / len(rows),
           "checkpoint_s": t["checkpoint"] / len(every)}
    # added in order, not sum(): Python 3.12's sum() compensates and differs in the last bit
    out["epoch_s"] = out["train_s"] + out["val_s"] + out["checkpoint_s"]
    out["films"] = sum(films) / len(rows)
    out["img_s"] = out["films"] / out["epoch_s"]
    out["img_s_steps"] = sum(r["img_s"] for r in rows) / len(rows)
    out["timings_s"] = t  # the whole run's: setup, first steps, test evaluation, ...
    return out


def cache_rate(bc):
    """(d): decoding alone, all cores, no cache."""
    root = scratch()
    write_phantom_covidx(root, bc.cache_images, 4, bc.png_size)
    _, splits = datasets.load_dataset(root, allow_missing_class=True)
    t0 = time.time()
    films.load_pixels(splits["train"], [int(s) for s in bc.sizes.split(",")], cache_dir=None)
    rate = bc.cache_images / (time.time() - t0)
    return {"images_s": rate, "per_core": rate / os.cpu_count(), "png_px": bc.png_size,
            "images": bc.cache_images}
