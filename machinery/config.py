"""The knobs of train.py: one dataclass whose fields become the command line, and the stages.

    cfg = parse_args(["--data", "PATH", "--stages", "128,224"])   # or parse_args() for sys.argv
    for stage in make_stages(cfg): ...                            # the stages are data

Defaults are the paper's recipe: 41 epochs at 128, 224 and 229 px, with fastai v1's one-cycle,
Adam, augmentation and cropping, which the paper ran. --recipe fastai-v1 | fastai-v2 sets the
knobs of that whole family at once (RECIPES); a flag given explicitly still wins. FIDELITY.md
lists every element of the recipe against fastai v1's source.
"""
import argparse
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields

from machinery.devices import PRECISIONS
from machinery.shortcuts import BOX, HIDE, WHOLE
from model import ARCHS
from schedule import MaxLR


def knob(default, help, choices=None, metavar=None):
    """A field of a config dataclass: its default, its --help text, its choices and the name
    of its value in --help. The help says what an empty or derived default means
    ("(default: ...)"); other defaults are added to it."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "metavar": metavar})


@dataclass
class Config:
    # data
    data: str = knob("", "COVIDx or ImageFolder root, or 'phantom' for synthetic films "
                     "(default: none: required, unless --demo)", metavar="PATH")
    train_split: str = knob("", "train split file (default: found in --data: train.txt, "
                            "train_split.txt, train_COVIDx*.txt)", metavar="FILE")
    test_split: str = knob("", "test split file (default: found in --data, as --train-split)",
                           metavar="FILE")
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
    # shortcut tests: what a model scores without the lungs, or on collections it never saw
    hide: str = knob("none", "a shortcut test, not a classifier: lungs (each film's central "
                     "box blacked out, its border alone seen) | outside (the central box "
                     "alone) | none (docs/data.md)", list(HIDE))
    hide_box: float = knob(WHOLE.box, "--hide: the central box's share of each side of the "
                           "square the model sees (the whole film, or with --resize crop its "
                           "centre square)")
    test_sources: str = knob("", "a held-out-source test: the test split is these sources' "
                             "films (the split files' 4th column, both files), training the "
                             "other sources' (default: none, the test split as given)",
                             metavar="NAME,..")
    # model
    arch: str = knob("resnet50", "torchvision ResNet body: " + " | ".join(ARCHS), list(ARCHS),
                     "NAME")
    weights: str = knob("imagenet", "imagenet | none | path to a state dict", metavar="W")
    ps: float = knob(0.5, "head dropout (fastai's ps): p of the last dropout, half of it for "
                     "the first")
    # recipe and schedule: one value per stage, or one value for all stages
    recipe: str = knob("paper", "paper: fastai v1 as the paper ran it, with the measured "
                       "exceptions in FIDELITY.md | fastai-v1: strictly v1 | fastai-v2: v2's "
                       "defaults (what each sets: below)", ["paper", "fastai-v1", "fastai-v2"])
    stages: str = knob("128,224,229", "image size of each stage", metavar="PX,..")
    frozen_epochs: str = knob("3,3,0", "epochs training the head only, per stage", metavar="N,..")
    unfrozen_epochs: str = knob("5,5,25", "epochs training all layers, per stage",
                                metavar="N,..")
    lr_frozen: str = knob("auto", "max LR per stage: auto (LR finder) | x (every group) | :x "
                          "(fastai's slice(x): x/10 for the body) | lo:hi (spread)",
                          metavar="LR,..")
    lr_unfrozen: str = knob("auto,auto,1e-6:1e-4", "auto = slice(finder's LR) | x | :x | lo:hi",
                            metavar="LR,..")
    batch_size: str = knob("64", "batch size per stage", metavar="N,..")
    one_cycle: str = knob("v1", "one-cycle steps: v1 (fastai v1's OneCycleScheduler) | torch "
                          "(OneCycleLR, fastai v2's within a step)", ["v1", "torch"])
    pct_start: float = knob(0.3, "one-cycle: fraction of steps warming up")
    div: float = knob(25.0, "one-cycle: start LR = max LR / div")
    div_final: float = knob(0.0, "one-cycle: final LR = max LR / div_final (default: div x "
                            "1e4, fastai v1's final_div: 2.5e5 at --div 25)")
    opt_reset: str = knob("fresh", "optimizer at each phase start: fresh (a new Adam at every "
                          "phase, the paper's script calling freeze()/unfreeze() at each) | "
                          "on-change (a new Adam only where the body is frozen or unfrozen: "
                          "the last stage goes on with the Adam of the one before) | moments "
                          "(moments zeroed, fastai v2) | none (one Adam for the run)",
                          ["fresh", "on-change", "moments", "none"])
    wd: float = knob(0.01, "AdamW decoupled weight decay (in the LR sweep too, as fastai)")
    discriminative: bool = knob(True, "one LR for all layer groups when unfrozen, not "
                                "fastai's slice (default: discriminative LRs)")
    lr_find_steps: int = knob(100, "LR finder: steps of the sweep")
    lr_find_start: float = knob(1e-7, "LR finder: first LR")
    lr_find_end: float = knob(10.0, "LR finder: last LR")
    lr_find_beta: float = knob(0.98, "LR finder: loss smoothing (EMA) factor")
    suggest: str = knob("valley", "LR finder suggestion: valley (fastai v2) | min_grad "
                        "(fastai v1) | steep | minimum", ["valley", "min_grad", "steep", "minimum"])
    # augmentation and class imbalance
    aug: bool = knob(True, "no augmentation (default: fastai v1's get_transforms)")
    rotate: float = knob(10.0, "max rotation, degrees")
    zoom: float = knob(1.1, "max zoom")
    warp: float = knob(0.2, "symmetric warp: max offset of each corner")
    lighting: float = knob(0.2, "brightness/contrast change")
    p_affine: float = knob(0.75, "probability of each of warp, rotation and zoom, per image")
    p_lighting: float = knob(0.75, "probability of each of brightness and contrast, per image")
    flip: bool = knob(True, "no left-right flips: the heart stays on its side (default: "
                      "flips, p 0.5, as fastai v1)")
    balance: bool = knob(False, "sample every class equally often")
    class_weights: bool = knob(False, "weight the loss by inverse class frequency")
    # device and speed
    device: str = knob("auto", "auto | cpu | cuda | cuda:N", metavar="DEV")
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
    # run: folder, seed, checkpoints
    demo: bool = knob(False, "quick demo: phantoms, random init, CPU, small sizes (what it "
                      "sets: below)")
    seed: int = knob(0, "random seed")
    runs: str = knob("runs", "folder for run folders", metavar="DIR")
    name: str = knob("", "run name (default: date-time and data set)")
    resume: str = knob("", "run folder to continue from its last complete epoch (last.pt); "
                       "takes no other flag (default: none, a new run)", metavar="RUN")
    config: str = knob("", "a run's config.json: its knobs become the defaults, the flags given "
                       "still win; a new run (its name, resume, overwrite and device are not "
                       "taken) (default: none)", metavar="FILE")
    save_best: bool = knob(False, "also keep best.pt: the weights of the epoch with the lowest "
                           "validation loss (at its stage's size; the paper keeps the last)")
    keep_last: bool = knob(False, "keep last.pt (weights and Adam's moments, 3x model.pt) "
                           "after the run finishes; only --resume reads it")
    overwrite: bool = knob(False, "replace the run in --runs/--name if there is one (without "
                           "it, an existing run folder is never written over)")
    save_every: float = knob(0.0, "write last.pt (in the background) at most every this many "
                             "seconds (default: 0, after every epoch unless the last write is "
                             "still going)")

    def __post_init__(self):
        if not self.div_final:  # fastai v1's OneCycleScheduler: final_div = div_factor * 1e4
            self.div_final = self.div * 1e4


# --help shows the knobs in these groups, in this order (every field in one)
GROUPS = {
    "data": ["data", "train_split", "test_split", "image_dir", "subtypes", "phantoms",
             "phantom_seed", "val_frac", "allow_patient_overlap", "allow_missing_class",
             "allow_duplicates", "cache_dir", "resize"],
    "shortcut tests": ["hide", "hide_box", "test_sources"],
    "model": ["arch", "weights", "ps"],
    "recipe and schedule (one value per stage, or one for all)": [
        "recipe", "stages", "frozen_epochs", "unfrozen_epochs", "lr_frozen", "lr_unfrozen",
        "batch_size", "one_cycle", "pct_start", "div", "div_final", "opt_reset", "wd",
        "discriminative", "lr_find_steps", "lr_find_start", "lr_find_end", "lr_find_beta",
        "suggest"],
    "augmentation and class imbalance": ["aug", "rotate", "zoom", "warp", "lighting",
                                         "p_affine", "p_lighting", "flip", "balance",
                                         "class_weights"],
    "device and speed": ["device", "precision", "channels_last", "cudnn_benchmark", "compile",
                         "compile_backend", "data_on", "data_gpu_gib", "sync_bn",
                         "dist_timeout"],
    "run folder": ["demo", "seed", "runs", "name", "resume", "config", "overwrite",
                   "save_every", "keep_last", "save_best"],
}

# The recipe families (--recipe): each sets these knobs; the rest keep their defaults.
# "paper" is the Config defaults: fastai v1, but for the LR finder's reading (FIDELITY.md)
# and bf16 autocast on CUDA.
RECIPES = {
    "paper": {},
    "fastai-v1": dict(suggest="min_grad", precision="fp32"),
    "fastai-v2": dict(one_cycle="torch", pct_start=0.25, div_final=1e5, opt_reset="moments",
                      suggest="valley"),
}

# The demo: every part of the recipe (3 stages, 5 LR finders, one-cycle, discriminative LRs)
# on small phantoms and sizes, so that it runs on a 2-core CPU in under a minute. It uses
# ResNet-18: a ResNet-50 step costs ~2.5x as much on 2 CPU cores, and learns more slowly.
# Short sweeps need a shorter loss average than fastai's 0.98 (a memory of ~50 steps).
DEMO = dict(data="phantom", phantoms=640, arch="resnet18", weights="none", device="cpu",
            stages="32,48,64", frozen_epochs="1,1,0", unfrozen_epochs="3,3,4",
            lr_unfrozen="auto", batch_size="32", lr_find_steps=30, lr_find_start=1e-4,
            lr_find_end=1.0, lr_find_beta=0.9)


def flag(name):
    return "--" + name.replace("_", "-")


# The flags that say how the data is read, offered by evaluate.py and audit.py as train.py's
READING = ("train_split", "test_split", "image_dir", "subtypes", "cache_dir")


def add_flags(parser, cls, groups=None, only=None):
    """One command-line flag per field of the dataclass `cls`, typed by its default, in
    argument groups ({title: [field names]}; None: all in `parser`, which may be a group);
    `only`: the fields to offer.

    A yes/no knob shows the flag that changes it (--demo, --no-flip); its twin (--no-demo,
    --flip) is still accepted, for scripts written before, but not shown."""
    all_fields = {f.name: f for f in fields(cls)}
    short = {int: "N", float: "X", str: "S"}
    for title, names in (groups or {None: list(all_fields)}).items():
        names = [n for n in names if only is None or n in only]
        g = parser.add_argument_group(title) if title and names else parser
        for name in names:
            f = all_fields[name]
            help, choices = f.metadata["help"], f.metadata["choices"]
            if isinstance(f.default, bool):  # the flag that changes it, and its hidden twin
                yes, no = flag(name), "--no-" + flag(name)[2:]
                shown, twin = (no, yes) if f.default else (yes, no)
                g.add_argument(shown, dest=name, action="store_const", const=not f.default,
                               default=f.default, help=help)
                g.add_argument(twin, dest=name, action="store_const", const=f.default,
                               help=argparse.SUPPRESS)
                continue
            if f.default == "" and "(default:" not in help:  # Help adds the others' defaults
                raise ValueError(f"{flag(name)}: its help must say what '' means")
            metavar = f.metadata["metavar"] or (
                "{" + ",".join(choices) + "}" if choices else short[type(f.default)])
            g.add_argument(flag(name), default=f.default, type=type(f.default),
                           choices=choices, help=help, metavar=metavar)


class Help(argparse.RawDescriptionHelpFormatter):
    """--help as wide as the code (100 columns), each flag's text beside it, and its default
    said once: where its help does not say it already, and never an empty one."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=100)

    def _get_help_string(self, action):
        text = action.help or ""
        said = "(default" in text or not action.option_strings
        if said or action.default is None or action.default is False or action.default in (
                "", argparse.SUPPRESS):  # a yes/no flag's off, or nothing: no default to say
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


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
    add_flags(p, Config, GROUPS, only)
    return p


# Keys config.json holds beside the knobs: what ran (run.write_run_folder), never read back
RAN = {"git_commit", "git_dirty", "torch", "arithmetic", "ranks"}


def saved_config(parser, args):
    """--config FILE: the knobs of a run's config.json (or of a file written by hand), less
    those that would make it that run again (its name, resume, overwrite) or tie it to its
    machine (device), and the config; a div_final that was div x 1e4 (the default, which
    config.json saves resolved) is left to follow --div.

    Checked as the command line is: a knob that takes a number or a comma list takes a JSON
    number or list too (written as the command line's text would be), a yes/no knob true or
    false; an unknown key is named with the closest knob. Every problem is said at once, and
    parse_args then validates the values as it does the flags'."""
    if not getattr(args, "config", ""):
        return {}
    try:
        with open(args.config) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"--config {args.config}: not a readable config.json ({e})")
    if not isinstance(saved, dict):
        parser.error(f"--config {args.config}: a JSON {type(saved).__name__}, not an object "
                     "of knobs ({\"stages\": \"128,224\", ...}, as a run's config.json holds)")
    knobs = {f.name: f.default for f in fields(Config)}
    kept, problems = {}, []
    for k, v in saved.items():
        if k not in knobs:
            if k not in RAN:
                near = difflib.get_close_matches(k, knobs, 1)
                problems.append(f"{k!r}: not a knob" + (f" (did you mean {near[0]!r}?)"
                                                        if near else ""))
            continue
        if k in ("name", "resume", "overwrite", "device", "config"):
            continue
        value, why = as_flag(v, knobs[k])
        if why:
            problems.append(f"{k!r}: {v!r} {why}")
        else:
            kept[k] = value
    if problems:
        parser.error("\n  ".join([f"--config {args.config}: {len(problems)} value(s) to fix:"]
                                 + problems))
    if kept.get("div_final") == kept.get("div", 25.0) * 1e4:  # derived from div, not chosen:
        del kept["div_final"]  # derived again, so that --div moves the final LR as it would
    return kept


def as_flag(v, default):
    """A JSON value as the knob whose default is `default` takes it: (value, None), or (None,
    what is wrong). Text is the command line's: 16 -> "16", [128, 224] -> "128,224"."""
    if isinstance(default, bool):
        return (v, None) if isinstance(v, bool) else (None, "is not true or false")
    if isinstance(default, str):
        if isinstance(v, list) and v and all(isinstance(x, (str, int, float)) and not
                                             isinstance(x, bool) for x in v):
            return ",".join(str(x) for x in v), None
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return str(v), None
        return None, "is not text, a number or a list of them"
    try:  # a number knob: a number, or its text; never a fraction cut to an integer
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or (
                isinstance(default, int) and isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return type(default)(v), None
    except ValueError:
        return None, f"is not {'an integer' if isinstance(default, int) else 'a number'}"


def parse_args(argv=None, extra=None, doc=__doc__, only=None):
    """Config from the command line (sys.argv without argv); every field is a flag.

    extra: {name: (type, default, help)} for flags of another script (lrfind.py); only: the
    fields that script offers (the rest keep their defaults); doc: --help's text.
    """
    p = make_parser(doc, only, extra)
    args = p.parse_args(argv)
    # the recipe's and the demo's values (or a run's, --config) become the defaults; flags
    # given explicitly still win
    preset = {**RECIPES[args.recipe], **(DEMO if args.demo else {}), **saved_config(p, args)}
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


def _list(value, conv, ok, what):
    """A comma list -> (values, None) or (None, what is wrong with it)."""
    try:
        vals = [conv(v) for v in str(value).split(",")]
    except ValueError:
        return None, f"{value!r} is not a comma list of {what}"
    bad = [v for v in vals if not ok(v)]
    return (None, f"{bad[0]!r} in {value!r}: give {what}") if bad else (vals, None)


def _lr(spec):
    """'auto' | x | :x | lo:hi (schedule.MaxLR), as given; a ValueError for anything else."""
    MaxLR.parse(spec)
    return spec


LISTS = {  # flag: (conversion, test, what it accepts)
    "stages": (int, lambda v: v >= 8, "image sizes of at least 8 px"),
    "frozen_epochs": (int, lambda v: v >= 0, "epoch counts (0 or more)"),
    "unfrozen_epochs": (int, lambda v: v >= 0, "epoch counts (0 or more)"),
    "batch_size": (int, lambda v: v >= 1, "batch sizes (1 or more)"),
    "lr_frozen": (_lr, bool, "auto, an LR (1e-3), :x (1e-4 for the body, 1e-3 for the head: "
                  ":1e-3) or lo:hi (1e-6:1e-4)"),
    "lr_unfrozen": (_lr, bool, "auto, an LR (1e-3), :x (1e-4 for the body, 1e-3 for the head: "
                    ":1e-3) or lo:hi (1e-6:1e-4)"),
}
RANGES = {  # flag: (test, what it accepts)
    "phantoms": (lambda v: v >= 8, "at least 8 films"),
    "hide_box": (lambda v: BOX[0] <= v <= BOX[1], f"a share of each side of {BOX[0]} to "
                 f"{BOX[1]}"),
    "val_frac": (lambda v: 0 <= v < 1, "a fraction in [0, 1): what is left must train"),
    "pct_start": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "div": (lambda v: v > 0, "a positive number"),
    "div_final": (lambda v: v > 0, "a positive number"),
    "wd": (lambda v: v >= 0, "0 or more"),
    "ps": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "lr_find_steps": (lambda v: v >= 2, "2 steps or more"),
    "lr_find_start": (lambda v: v > 0, "a positive LR"),
    "lr_find_end": (lambda v: v > 0, "a positive LR"),
    "lr_find_beta": (lambda v: 0 <= v < 1, "a factor in [0, 1)"),
    "rotate": (lambda v: 0 <= v <= 180, "degrees in [0, 180]"),
    "zoom": (lambda v: v >= 1, "a magnification of 1 or more"),
    "warp": (lambda v: 0 <= v < 1, "a magnitude in [0, 1)"),
    "lighting": (lambda v: 0 <= v < 1, "a magnitude in [0, 1)"),
    "p_affine": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "p_lighting": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    "phantom_seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    "save_every": (lambda v: v >= 0, "seconds, 0 or more"),
    "data_gpu_gib": (lambda v: v >= 0, "GiB, 0 or more"),
    "dist_timeout": (lambda v: v > 0, "seconds, more than 0"),
    "cudnn_benchmark": (lambda v: v in ("on", "off") or v.isdigit() and int(v) > 0,
                        "on, off or a number of algorithms (1 or more)"),
}
FILES = ("train_split", "test_split", "subtypes")  # files that must exist when given
# Keys of config.json that say where and how a run was kept, not what it trained: bookkeeping,
# the machine (device: as resolved, e.g. cuda:0), shortcuts that only set other keys (demo),
# code versions (warned about instead). compare.py groups runs without them; the model card
# does not count them as deviations from the paper.
BOOKKEEPING = {"seed", "name", "runs", "resume", "config", "overwrite", "cache_dir",
               "save_every", "keep_last", "save_best", "device", "demo", "git_commit",
               "git_dirty", "torch", "arithmetic", "data_on", "data_gpu_gib",
               "dist_timeout"}


def validate(cfg):
    """Everything wrong with the flags, one message each naming the flag and what it accepts,
    before any work is done ([] when all is well)."""
    problems = []
    n_stages = None
    for name, (conv, ok, what) in LISTS.items():
        vals, why = _list(getattr(cfg, name), conv, ok, what)
        if why:
            problems.append(f"{flag(name)} {why}")
        elif name == "stages":
            n_stages = len(vals)
        elif n_stages and len(vals) not in (1, n_stages):
            problems.append(f"{flag(name)} has {len(vals)} values for {n_stages} stages "
                            f"({cfg.stages}): give one per stage, or one for all")
    for name, (ok, what) in RANGES.items():
        v = getattr(cfg, name)
        if not ((isinstance(v, str) or math.isfinite(v)) and ok(v)):
            problems.append(f"{flag(name)} {v}: give {what}")
    if not any(int(e) for name in ("frozen_epochs", "unfrozen_epochs")
               for e in getattr(cfg, name).split(",") if e.strip().lstrip("-").isdigit()):
        problems.append("--frozen-epochs and --unfrozen-epochs are all 0: nothing to train")
    if cfg.lr_find_end <= cfg.lr_find_start:
        problems.append(f"--lr-find-end {cfg.lr_find_end} must be above --lr-find-start "
                        f"{cfg.lr_find_start}")
    if cfg.data and cfg.data != "phantom" and not os.path.isdir(cfg.data):
        problems.append(f"--data {cfg.data}: no such folder (or give --data phantom)")
    for name in FILES + ("image_dir",):
        path = getattr(cfg, name)
        if path and not (os.path.isdir if name == "image_dir" else os.path.isfile)(path):
            what = "folder" if name == "image_dir" else "file"
            problems.append(f"{flag(name)} {path}: no such {what}")
    if cfg.hide == "none" and cfg.hide_box != WHOLE.box:
        problems.append(f"--hide-box {cfg.hide_box}: a box of what? Give --hide lungs or "
                        "--hide outside with it")
    if cfg.weights not in ("imagenet", "none") and not os.path.isfile(cfg.weights):
        problems.append(f"--weights {cfg.weights}: give imagenet, none or a state dict file")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        problems.append(f"--device {cfg.device}: give auto, cpu, cuda or cuda:N")
    if cfg.name and (os.sep in cfg.name or cfg.name in (".", "..")):
        problems.append(f"--name {cfg.name}: a folder name, without {os.sep} (--runs picks "
                        "the folder it goes in)")
    return problems


@dataclass
class Stage:
    """One stage of progressive resizing: its image size, epochs head-only then whole network,
    batch size, and the LR spec of each phase (auto | x | :x | lo:hi)."""
    size: int
    frozen_epochs: int
    unfrozen_epochs: int
    batch_size: int
    lr_frozen: str
    lr_unfrozen: str


def make_stages(cfg):
    """The stages as data: comma lists in the config, one value per stage (or one for all).

    A default list longer than --stages (the paper's three stages) is cut to the stages given;
    a list given on the command line must fit them.
    """
    sizes = [int(s) for s in cfg.stages.split(",")]
    cols = {}
    for name, conv in [("frozen_epochs", int), ("unfrozen_epochs", int), ("batch_size", int),
                       ("lr_frozen", str), ("lr_unfrozen", str)]:
        vals = [conv(v) for v in getattr(cfg, name).split(",")]
        if len(vals) == 1:
            vals *= len(sizes)
        if len(vals) > len(sizes) and getattr(cfg, name) == Config.__dataclass_fields__[
                name].default:
            vals = vals[:len(sizes)]
        if len(vals) != len(sizes):
            raise SystemExit(f"--{name.replace('_', '-')} has {len(vals)} values for "
                             f"{len(sizes)} stages ({cfg.stages})")
        cols[name] = vals
    return [Stage(s, *(cols[k][i] for k in cols)) for i, s in enumerate(sizes)]
