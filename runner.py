"""What a run is made of, for train.py and lrfind.py: the data decoded and on the device, the
model, the optimizer, the step, and the run folder.

    run = setup(cfg)                      # read, check and decode the data; model, AdamW, step
    tensors = stage_tensors(run, 128)     # {split: (uint8 films, labels, shapes)} on the device
    for x, y in train_batches(run, tensors, 128, 64, "tag").epoch(0): run.step(x, y)
    loss, acc, probs = predict(run, *tensors["val"], 128)
"""
import dataclasses
import json
import os
import random
import shutil
import subprocess
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import data
import ddp
import devices
import films
from batches import Augment, Batches, HostImages, on_host
from checkpoint import Checkpointer, check_writable
from config import Config, make_stages
from model import build_model, class_logits, layer_groups, set_body_frozen


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
    forward: object  # what the step calls: infer, in DistributedDataParallel under torchrun
    compiled: object  # torch.compile(model), made when a stage first asks for it
    aug: object
    loss_weight: torch.Tensor = None
    infer: object = None  # the model, or its compiled version (chosen per stage): evaluation's
    ckpt: object = None  # checkpoint.Checkpointer: snapshots, last.pt
    started: float = 0.0  # time.time() when the run began, less the time before a resume
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
    and make the run folder.

    Under torchrun every rank runs this; rank 0 alone checks and writes the run folder (the
    others' run.dir is None: they write nothing), and a node's first rank decodes the films
    into the cache while the node's other ranks wait, then read it."""
    dev_name = ddp.init(cfg.device, cfg.dist_timeout)  # torchrun: the process group
    # before any work: a run already there is never written over (rank 0 checks, all stop)
    run_dir = ddp.each(lambda: run_folder(cfg) if ddp.main() else None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = devices.pick_device(dev_name)
    amp, cl = devices.precision(dev, cfg.precision), devices.channels_last(dev, cfg.channels_last)
    print("config: " + json.dumps(dataclasses.asdict(cfg)))
    problems = data.Problems()  # all that is wrong with the data, said once, before training
    classes, splits = data.load_dataset(
        cfg.data, cfg.train_split, cfg.test_split, cfg.image_dir, cfg.subtypes, cfg.phantoms,
        cfg.phantom_seed, cfg.allow_patient_overlap, cfg.allow_missing_class, problems)
    # Decode once, at every stage size in one pass; val is carved from the decoded train set
    sizes = sizes or [s.size for s in make_stages(cfg)]
    cache = cfg.cache_dir or None
    if cache is None and ddp.world() > 1 and splits["train"].pixels is None:
        cache = ddp.node_cache_dir()  # decoded once per node all the same
        print(f"--cache-dir '': the node's ranks share the films through {cache} (kept)")
    if not ddp.local_main():
        ddp.barrier()  # while the node's first rank decodes: then the cache holds it all
    full = films.load_pixels(splits["train"], sizes, cache, cfg.resize, problems=problems)
    test = films.load_pixels(splits["test"], sizes, cache, cfg.resize, problems=problems)
    problems.check()
    if ddp.local_main():
        ddp.barrier()
    tr, va = data.split_patients(splits["train"], cfg.val_frac, cfg.seed)
    items = {"train": splits["train"].subset(tr), "val": splits["train"].subset(va),
             "test": splits["test"]}
    for k, it in items.items():
        counts = np.bincount(it.labels, minlength=len(classes))
        print(f"{k:>5}: {len(it):5d} images, " +
              ", ".join(f"{c} {n}" for c, n in zip(classes, counts)))
    split_films = {"train": full.subset(tr), "val": full.subset(va), "test": test}

    model = build_model(len(classes), cfg.weights, cfg.arch, cfg.ps).to(dev)
    ddp.seed_rank(cfg.seed)  # the same weights everywhere, each rank its own dropout
    if cfg.sync_bn:
        model = ddp.sync_batchnorm(model, dev)
    # The run folder comes last: a run that cannot start leaves none behind (and, with
    # --overwrite, the old run whole). fp32 weights in each stage checkpoint and model.pt;
    # last.pt adds Adam's two moments.
    need = (len(make_stages(cfg)) + 4) * 4 * sum(p.numel() for p in model.parameters())
    ddp.each(lambda: ddp.main() and write_run_folder(cfg, run_dir, classes, dev, need))

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
    ranks = f", {ddp.world()} ranks ({torch.distributed.get_backend()}" + (
        ", SyncBatchNorm)" if cfg.sync_bn else ")") if ddp.world() > 1 else ""
    print(f"device {devices.describe(dev)}: {'bf16 autocast' if amp else 'fp32'}, "
          f"{'channels_last' if cl else 'NCHW'}, {'fused' if opt.defaults.get('fused') else 'for-each'} "
          f"AdamW, compile {cfg.compile}{ranks}; run folder {run_dir}")
    run = Run(cfg, run_dir, dev, amp, cl, classes, items, split_films, model, opt, step=None,
              forward=model, compiled=None, aug=aug, loss_weight=weight, infer=model)
    run.step = make_step(run)
    run.ckpt = Checkpointer(run, run_dir and os.path.join(run_dir, "last.pt"), cfg.save_every)
    return run


def write_run_folder(cfg, run_dir, classes, dev, need_bytes):
    """Make the run folder (rank 0): check it can take the run, replace an old run there with
    --overwrite, write config.json and classes.json."""
    check_writable(run_dir, need_bytes)
    if cfg.overwrite and not cfg.resume and os.path.isfile(os.path.join(run_dir, "config.json")):
        shutil.rmtree(run_dir)  # a run folder (config.json), and only now
        os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "git_commit": git_commit(),
                   "torch": torch.__version__, "device": str(dev),
                   **({"ranks": ddp.world()} if ddp.world() > 1 else {})}, f, indent=1)
    with open(os.path.join(run_dir, "classes.json"), "w") as f:
        json.dump(classes, f)


def run_folder(cfg):
    """--runs/--name (default name: date-time and data set). A folder that holds a run
    (config.json) is refused unless this is its --resume, or --overwrite replaces it."""
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S-") + os.path.basename(
        os.path.normpath(cfg.data))
    run_dir = os.path.join(cfg.runs, name)
    if os.path.isfile(os.path.join(run_dir, "config.json")) and not (cfg.resume or
                                                                       cfg.overwrite):
        raise SystemExit(f"{run_dir} already holds a run; continue it with --resume "
                         f"{run_dir}, replace it with --overwrite, or choose another --name")
    return run_dir


def use_compile(run, stage):
    """Pick the compiled or the eager model for this stage (see devices.compile_pays)."""
    c = run.cfg.compile
    images = (stage.frozen_epochs + stage.unfrozen_epochs) * len(run.items["train"])
    on = c == "on" or (c == "auto" and run.device.type == "cuda"
                       and devices.compile_pays(images, stage.size))
    if on and run.compiled is None:  # compiles lazily, at the first call per shape
        run.compiled = torch.compile(run.model, dynamic=False,
                                     backend=run.cfg.compile_backend)
    run.infer = run.forward = run.compiled if on else run.model
    return on


def freeze(run, frozen):
    """Freeze or unfreeze the body; under torchrun, DDP is made anew around what the step
    calls, for the parameters that now train (ddp.wrap)."""
    set_body_frozen(run.model, frozen)
    run.forward = ddp.wrap(run.infer, run.device)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def stage_tensors(run, size):
    """{split: (uint8 films, labels, height/width or None)} at this stage's size: the films
    moved to the device once, or left in host memory (HostImages, --data-on); labels and
    shapes on the device. The films' shapes matter only to --resize crop."""
    crop, dev = run.cfg.resize == "crop", run.device
    on_host = films_on_host(run, size)
    return {k: (HostImages(f, size, dev) if on_host else f.to(size, dev),
                torch.tensor(run.items[k].labels, device=dev),
                f.hw.to(dev) if crop else None) for k, f in run.films.items()}


def films_on_host(run, size):
    """--data-on: whether this stage's films (every split) stay in host memory."""
    nbytes = sum(f.nbytes(size) for f in run.films.values())
    return on_host(nbytes, run.device, run.cfg.data_on, run.cfg.data_gpu_gib, f"at {size} px")


def train_batches(run, tensors, size, batch_size, tag):
    """Shuffled, augmented training batches; each phase draws its own reproducible order
    (the same on every rank under torchrun: each takes its slice of the global batch)."""
    images, labels, hw = tensors["train"]
    return Batches(images, labels, batch_size, size, aug=run.aug, hw=hw,
                   balance=run.cfg.balance, seed=run.cfg.seed + zlib.crc32(tag.encode()),
                   channels_last=run.channels_last, rank=ddp.rank(), world=ddp.world())


def start_phase(run, frozen):
    """Freeze or unfreeze the body, and set the optimizer as fastai would at that call.

    --opt-reset fresh: a new Adam (fastai v1's freeze()/unfreeze() call create_opt: moments
    zero, step 0, beta1 back to 0.9, which is what the phase's LR finder runs with);
    moments: moments zero, beta1 where the last schedule left it (fastai v2's clear_state);
    none: one optimizer for the whole run, moments carried across phases and stages.
    """
    freeze(run, frozen)
    if run.cfg.opt_reset != "none":
        run.opt.state.clear()  # AdamW makes its state anew at the next step
    if run.cfg.opt_reset == "fresh":
        for g in run.opt.param_groups:
            g["betas"] = BETAS


def predict(run, x, y, hw, size, batch_size=256):
    """(mean loss, accuracy, class probabilities (N, C) on the CPU) over (x, y), unaugmented.

    Under torchrun each rank predicts its shard, and every rank gets all the logits."""
    lo, hi = ddp.shard(len(y))
    part = x.part(lo, hi) if isinstance(x, HostImages) else x[lo:hi]
    logits = class_logits(run.model, run.infer, part, size, None if hw is None else hw[lo:hi],
                          batch_size, amp=run.amp, channels_last=run.channels_last)
    logits = ddp.gather_rows(logits, len(y))
    n = max(1, len(y))
    loss = F.cross_entropy(logits, y, weight=run.loss_weight, reduction="sum").item() / n
    return loss, (logits.argmax(1) == y).float().sum().item() / n, logits.softmax(1).cpu()


def add_time(run, kind, seconds):
    run.timings[kind] = run.timings.get(kind, 0.0) + seconds
