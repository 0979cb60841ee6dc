"""The knobs of train.py: one dataclass whose fields become the command line, and the stages.

    cfg = parse_args(["--data", "PATH", "--stages", "128,224"])   # or parse_args() for sys.argv
    for stage in make_stages(cfg): ...                            # the stages are data

The recipe's knobs default to schedule.PAPER, the paper's recipe as one value (41 epochs at 128,
224 and 229 px, with fastai v1's one-cycle, Adam and augmentation): each of its fields is the
knob of the same name, its stages comma lists (as_knobs). --recipe fastai-v1 | fastai-v2 sets
what schedule.FASTAI_V1 or FASTAI_V2 changes (RECIPES); a flag given explicitly still wins.
FIDELITY.md lists every element of the recipe against fastai v1's source.
"""
import argparse
import os
import sys
from dataclasses import dataclass, fields

from machinery.devices import PRECISIONS
from machinery.flags import LISTS, Help, add_flags, flag, knob, saved_config, validate
from machinery.shortcuts import HIDE, WHOLE
from model import ARCHS, PS
from schedule import FASTAI_V1, FASTAI_V2, PAPER, Stage


def as_knobs(recipe):
    """A schedule.Recipe as the knobs write it: {knob: value}, each field of its stages a
    comma list, one value per stage (one for all where every stage has the same)."""
    knobs = {f.name: getattr(recipe, f.name) for f in fields(recipe)
             if f.name not in ("stages", "moms")}  # moms: not a flag
    for f in fields(Stage):
        values = [str(getattr(st, f.name)) for st in recipe.stages]
        same = len(set(values)) == 1 and f.name != "size"
        knobs["stages" if f.name == "size" else f.name] = values[0] if same else ",".join(values)
    return knobs


PAPER_KNOBS = as_knobs(PAPER)  # the defaults of the recipe's knobs


@dataclass
class Config:
    data: str = knob("", "COVIDx or ImageFolder root, or 'phantom' for synthetic films "
                     "(default: none: required, unless --demo)", metavar="PATH", group="data")
    train_split: str = knob("", "train split file: a name in --data, or an absolute path "
                            "(default: found in --data: train.txt, train_split.txt, "
                            "train_COVIDx*.txt)", metavar="FILE")
    test_split: str = knob("", "test split file, as --train-split (default: found in --data, "
                           "as --train-split)", metavar="FILE")
    image_dir: str = knob("", "folder holding all images (default: --data/train and "
                          "--data/test)", metavar="DIR")
    subtypes: str = knob("", "subtype.csv: relabel pneumonia as bacterial/viral, 4 classes "
                         "(default: none, the labels as given)", metavar="CSV")
    phantoms: int = knob(2000, "number of phantom training films (--data phantom)")
    phantom_seed: int = knob(0, "seed of the phantom films themselves: fixed, so that runs "
                             "with another --seed train and test on the same films")
    val_frac: float = knob(0.1, "fraction of training patients held out for validation")
    allow_patient_overlap: bool = knob(False, "go on when patients are in both train and test")
    allow_missing_class: bool = knob(False, "go on when a class has no train or no test images")
    allow_duplicates: bool = knob(False, "go on when a test film has an exact or near duplicate "
                                  "in training (audit.py lists them all)")
    cache_dir: str = knob(os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        "~/.cache")), "covid-resnet"), "where decoded images are cached ('' for none)",
        metavar="DIR")
    resize: str = knob("crop", "crop: shorter side to the size, random square in training, "
                       "centre in evaluation (fastai v1) | squish: the whole film",
                       ["crop", "squish"])
    # what a model scores without the lungs, or on collections it never saw
    hide: str = knob("none", "a shortcut test, not a classifier: lungs (each film's central "
                     "box blacked out, its border alone seen) | outside (the central box "
                     "alone) | none (docs/data.md)", list(HIDE), group="shortcut tests")
    hide_box: float = knob(WHOLE.box, "--hide: the central box's share of each side of the "
                           "square the model sees (the whole film, or with --resize crop its "
                           "centre square)")
    test_sources: str = knob("", "a held-out-source test: the test split is these sources' "
                             "films (the split files' 4th column, both files), training the "
                             "other sources' (default: none, the test split as given)",
                             metavar="NAME,..")
    arch: str = knob("resnet50", "torchvision ResNet body: " + " | ".join(ARCHS), list(ARCHS),
                     "NAME", group="model")
    weights: str = knob("imagenet", "imagenet | none | path to a state dict", metavar="W")
    ps: float = knob(PS, "head dropout (fastai's ps): p of the last dropout, half of it for "
                     "the first")
    recipe: str = knob("paper", "paper: fastai v1 as the paper ran it, with the measured "
                       "exceptions in FIDELITY.md | fastai-v1: strictly v1 | fastai-v2: v2's "
                       "defaults (what each sets: below)", ["paper", "fastai-v1", "fastai-v2"],
                       group="recipe and schedule (one value per stage, or one for all)")
    stages: str = knob(PAPER_KNOBS["stages"], "image size of each stage", metavar="PX,..")
    frozen_epochs: str = knob(PAPER_KNOBS["frozen_epochs"], "epochs training the head only, "
                              "per stage", metavar="N,..")
    unfrozen_epochs: str = knob(PAPER_KNOBS["unfrozen_epochs"], "epochs training all layers, "
                                "per stage", metavar="N,..")
    lr_frozen: str = knob(PAPER_KNOBS["lr_frozen"], "max LR per stage: auto (LR finder) | x "
                          "(every group) | :x (fastai's slice(x): x/10 for the body) | lo:hi "
                          "(spread)", metavar="LR,..")
    lr_unfrozen: str = knob(PAPER_KNOBS["lr_unfrozen"], "auto = slice(finder's LR) | x | :x | "
                            "lo:hi", metavar="LR,..")
    batch_size: str = knob(PAPER_KNOBS["batch_size"], "batch size per stage", metavar="N,..")
    one_cycle: str = knob(PAPER.one_cycle, "one-cycle steps: v1 (fastai v1's "
                          "OneCycleScheduler) | torch (OneCycleLR, fastai v2's within a step)",
                          ["v1", "torch"])
    pct_start: float = knob(PAPER.pct_start, "one-cycle: fraction of steps warming up")
    div: float = knob(PAPER.div, "one-cycle: start LR = max LR / div")
    div_final: float = knob(PAPER.div_final, "one-cycle: final LR = max LR / div_final "
                            "(default: div x 1e4, fastai v1's final_div: 2.5e5 at --div 25)")
    opt_reset: str = knob(PAPER.opt_reset, "optimizer at each phase start: fresh (a new Adam "
                          "at every phase, the paper's script calling freeze()/unfreeze()) | "
                          "on-change (a new Adam only where the body is frozen or unfrozen: "
                          "the last stage goes on with the Adam of the one before) | moments "
                          "(moments zeroed, fastai v2) | none (one Adam for the run)",
                          ["fresh", "on-change", "moments", "none"])
    wd: float = knob(PAPER.wd, "AdamW decoupled weight decay (in the LR sweep too, as fastai)")
    discriminative: bool = knob(True, "one LR for all layer groups when unfrozen, not "
                                "fastai's slice (default: discriminative LRs)")
    lr_find_steps: int = knob(PAPER.lr_find_steps, "LR finder: steps of the sweep")
    lr_find_start: float = knob(PAPER.lr_find_start, "LR finder: first LR")
    lr_find_end: float = knob(PAPER.lr_find_end, "LR finder: last LR")
    lr_find_beta: float = knob(PAPER.lr_find_beta, "LR finder: loss smoothing (EMA) factor")
    suggest: str = knob(PAPER.suggest, "LR finder suggestion: valley (fastai v2) | min_grad "
                        "(fastai v1) | steep | minimum", ["valley", "min_grad", "steep", "minimum"])
    aug: bool = knob(True, "no augmentation (default: fastai v1's get_transforms)",
                     group="augmentation and class imbalance")
    rotate: float = knob(PAPER.rotate, "max rotation, degrees")
    zoom: float = knob(PAPER.zoom, "max zoom")
    warp: float = knob(PAPER.warp, "symmetric warp: max offset of each corner")
    lighting: float = knob(PAPER.lighting, "brightness/contrast change")
    p_affine: float = knob(PAPER.p_affine, "probability of each of warp, rotation and zoom, "
                           "per image")
    p_lighting: float = knob(PAPER.p_lighting, "probability of each of brightness and "
                             "contrast, per image")
    flip: bool = knob(PAPER.flip, "no left-right flips: the heart stays on its side (default: "
                      "flips, p 0.5, as fastai v1)")
    balance: bool = knob(False, "sample every class equally often")
    class_weights: bool = knob(False, "weight the loss by inverse class frequency")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N", metavar="DEV",
                       group="device and speed")
    precision: str = knob("auto", "auto (bf16 on CUDA, fp32 on the CPU; fp32 with --recipe "
                          "fastai-v1) | bf16 (autocast, either device) | fp32 (TF32 off, as in "
                          "2020) | tf32 (fp32, TF32 convolutions and matmuls on CUDA); the head "
                          "and every reported number run in fp32", list(PRECISIONS))
    channels_last: str = knob("auto", "NHWC memory layout: auto (on CUDA only) | on | off",
                              ["auto", "on", "off"])
    cudnn_benchmark: str = knob("on", "cuDNN autotuning on CUDA: on (each convolution shape "
                                "tries cuDNN's algorithms once and keeps the fastest) | off "
                                "(cuDNN's heuristics) | N (on, at most N algorithms a shape)",
                                metavar="on|off|N")
    compile: str = knob("auto", "torch.compile: auto (per stage, on CUDA, where it pays) | on "
                        "| off", ["auto", "on", "off"])
    compile_backend: str = knob("inductor", "torch.compile backend: inductor (generated "
                                "kernels) | aot_eager (traced, torch's own kernels: for "
                                "checking and debugging) | eager", ["inductor", "aot_eager",
                                                                    "eager"])
    data_on: str = knob("auto", "where the stage's films are held: gpu (on the device, "
                        "batches made there) | cpu (host memory or the memory-mapped cache, "
                        "each batch gathered into pinned memory and copied asynchronously) | "
                        "auto (gpu when they fit in --data-gpu-gib)", ["auto", "gpu", "cpu"])
    data_gpu_gib: float = knob(0.0, "--data-on auto: the most device memory the films may "
                               "take (default: 0, half the GPU's free memory; no limit on the "
                               "CPU)")
    sync_bn: bool = knob(False, "under torchrun: BatchNorm statistics over the global batch "
                         "(SyncBatchNorm) rather than each GPU's own (torchvision's default)")
    dist_timeout: float = knob(600.0, "under torchrun: seconds a collective may wait for "
                               "the other ranks before the job fails (a dead or hung rank "
                               "ends it then: NCCL's watchdog ends the waiting process); "
                               "the wait while a node's first rank decodes the films into "
                               "the cache has 6 times as long")
    demo: bool = knob(False, "quick demo: phantoms, random init, CPU, small sizes (what it "
                      "sets: below)", group="run folder")
    seed: int = knob(0, "random seed")
    runs: str = knob("runs", "folder for run folders", metavar="DIR")
    name: str = knob("", "run name (default: date-time and data set)")
    resume: str = knob("", "run folder to continue from its last complete epoch (last.pt); "
                       "takes no other flag (default: none, a new run)", metavar="RUN")
    config: str = knob("", "a run's config.json: its knobs become the defaults, the flags given "
                       "still win; a new run (its name, resume, overwrite and device are not "
                       "taken) (default: none)", metavar="FILE")
    overwrite: bool = knob(False, "replace the run in --runs/--name if there is one (without "
                           "it, an existing run folder is never written over)")
    save_every: float = knob(0.0, "write last.pt (in the background) at most every this many "
                             "seconds (default: 0, after every epoch unless the last write is "
                             "still going)")
    keep_last: bool = knob(False, "keep last.pt (weights and Adam's moments, 3x model.pt) "
                           "after the run finishes; only --resume reads it")
    save_best: bool = knob(False, "also keep best.pt: the weights of the epoch with the lowest "
                           "validation loss (at its stage's size; the paper keeps the last)")

    def __post_init__(self):
        if not self.div_final:  # fastai v1's OneCycleScheduler: final_div = div_factor * 1e4
            self.div_final = self.div * 1e4


def changes(recipe):
    """The knobs in which `recipe` differs from the paper's."""
    return {k: v for k, v in as_knobs(recipe).items() if v != PAPER_KNOBS[k]}


# The recipe families (--recipe): each sets these knobs; the rest keep their defaults.
# "paper" is the Config defaults: fastai v1, but for the LR finder's reading (FIDELITY.md)
# and bf16 autocast on CUDA; fastai-v1 computes in fp32 as 2020's GPUs did.
RECIPES = {"paper": {}, "fastai-v1": {**changes(FASTAI_V1), "precision": "fp32"},
           "fastai-v2": changes(FASTAI_V2)}

# The demo: every part of the recipe (3 stages, 5 LR finders, one-cycle, discriminative LRs)
# on small phantoms and sizes, so that it runs on a 2-core CPU in under a minute. It uses
# ResNet-18: a ResNet-50 step costs ~2.5x as much on 2 CPU cores, and learns more slowly.
# Short sweeps need a shorter loss average than fastai's 0.98 (a memory of ~50 steps).
DEMO = dict(data="phantom", phantoms=640, arch="resnet18", weights="none", device="cpu",
            stages="32,48,64", frozen_epochs="1,1,0", unfrozen_epochs="3,3,4",
            lr_unfrozen="auto", batch_size="32", lr_find_steps=30, lr_find_start=1e-4,
            lr_find_end=1.0, lr_find_beta=0.9)


# The flags that say how the data is read, offered by evaluate.py and audit.py as train.py's
READING = ("train_split", "test_split", "image_dir", "subtypes", "cache_dir")


def epilog(only=None):
    """What --recipe and --demo set, from RECIPES and DEMO (of the flags in `only`)."""
    said = lambda knobs: " ".join(f"{flag(k)} {v}" for k, v in knobs.items()
                                  if only is None or k in only)
    lines = ["what --recipe and --demo set (a flag given explicitly still wins):"]
    for name, knobs in RECIPES.items():
        lines.append(f"  --recipe {name}: " + (said(knobs) or "the defaults above"))
    lines.append("  --demo: " + said(DEMO))
    return "\n".join(lines)


def make_parser(doc=__doc__, only=None, extra=None):
    """The command line of train.py (lrfind.py: `only` its fields, and `extra` flags
    {name: (type, default, help)}); doc: the script's docstring, for --help."""
    doc = doc.split("\nWhat it teaches")[0]  # a script's docstring, less its reading notes
    p = argparse.ArgumentParser(description=doc, epilog=epilog(only), formatter_class=Help,
                                usage="%(prog)s [--demo | --data PATH] [flags below]")
    for k, (t, d, h) in (extra or {}).items():
        p.add_argument("--" + k, type=t, default=d, help=f"{h} (default: {d})",
                       metavar={int: "N", float: "X"}.get(t, k.upper()))
    add_flags(p, Config, only)
    return p


def parse_args(argv=None, extra=None, doc=__doc__, only=None):
    """Config from the command line (sys.argv without argv); every field is a flag.

    extra: {name: (type, default, help)} for flags of another script (lrfind.py); only: the
    fields that script offers (the rest keep their defaults); doc: --help's text.
    """
    p = make_parser(doc, only, extra)
    args = p.parse_args(argv)
    # the recipe's and the demo's values (or a run's, --config) become the defaults; flags
    # given explicitly still win
    preset = {**RECIPES[args.recipe], **(DEMO if args.demo else {}),
              **saved_config(p, args, Config)}
    p.set_defaults(**preset)
    args = p.parse_args(argv)
    values = {f.name: preset.get(f.name, f.default) for f in fields(Config)}
    values.update((k, v) for k, v in vars(args).items() if k in values)
    cfg = Config(**values)
    if cfg.resume:
        given = [a for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith("--") and a.split("=")[0] != "--resume"]
        if given:
            p.error(f"--resume goes on with the run's saved config; it takes no other flags "
                    f"(here: {', '.join(given)})")
        return (cfg, {k: getattr(args, k) for k in extra}) if extra else cfg
    if not cfg.data:
        p.error("pass --data PATH (a COVIDx or ImageFolder root), --data phantom, or --demo")
    # a default list (the paper's three stages, the demo's) is cut to the stages given
    n = len(cfg.stages.split(","))
    for name in LISTS:
        vals = getattr(cfg, name).split(",")
        if name != "stages" and len(vals) > n and getattr(cfg, name) == preset.get(
                name, Config.__dataclass_fields__[name].default):
            setattr(cfg, name, ",".join(vals[:n]))
    problems = validate(cfg)
    if problems:
        p.error("\n  ".join([f"{len(problems)} flag(s) to fix:"] + problems))
    return (cfg, {k: getattr(args, k) for k in extra}) if extra else cfg


# Keys of config.json that say where and how a run was kept, not what it trained: bookkeeping,
# the machine (device: as resolved, e.g. cuda:0), shortcuts that only set other keys (demo),
# code versions (warned about instead). compare.py groups runs without them; the model card
# does not count them as deviations from the paper.
BOOKKEEPING = {"seed", "name", "runs", "resume", "config", "overwrite", "cache_dir",
               "save_every", "keep_last", "save_best", "device", "demo", "git_commit",
               "git_dirty", "torch", "arithmetic", "data_on", "data_gpu_gib",
               "dist_timeout"}


def make_stages(cfg):
    """The stages as data (schedule.Stage records) from the config's comma lists, one value per
    stage or one for all. A default list longer than --stages (the paper's three stages) is
    cut to the stages given (parse_args has done so; a Config made in code, not yet); one
    given must fit them (parse_args has checked)."""
    sizes = [int(s) for s in cfg.stages.split(",")]
    cols = []
    for name, conv in [("frozen_epochs", int), ("unfrozen_epochs", int), ("batch_size", int),
                       ("lr_frozen", str), ("lr_unfrozen", str)]:
        vals = [conv(v) for v in getattr(cfg, name).split(",")]
        if getattr(cfg, name) == Config.__dataclass_fields__[name].default:
            vals = vals[:len(sizes)]
        if len(vals) not in (1, len(sizes)):
            raise SystemExit(f"{flag(name)} has {len(vals)} values for {len(sizes)} stages "
                             f"({cfg.stages})")
        cols.append(vals * len(sizes) if len(vals) == 1 else vals)
    return [Stage(*st) for st in zip(sizes, *cols)]
