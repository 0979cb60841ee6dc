"""The command line made from a config dataclass, and the knobs' checks: one flag per field
(knob, add_flags), --help as wide as the code (Help), every bad value named with what it takes
(validate), a run's config.json read back as the command line would be (saved_config).

    add_flags(p, Config)          # every field a flag, in the --help groups its knobs open
    problems = validate(cfg)      # [] when all is well

machinery/config.py holds the knobs themselves (Config) and makes train.py's command line.
"""
import argparse
import difflib
import json
import math
import os
import re
from dataclasses import field, fields

from machinery.shortcuts import BOX, WHOLE
from schedule import PAPER, MaxLR


def knob(default, help, choices=None, metavar=None, group=None):
    """A field of a config dataclass: its default, its --help text, its choices and the name
    of its value in --help; `group`: the --help group it opens (it and the fields after it).
    The help says what an empty or derived default means ("(default: ...)"); other defaults
    are added to it."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "metavar": metavar, "group": group})


def flag(name):
    return "--" + name.replace("_", "-")


def add_flags(parser, cls, only=None, grouped=True):
    """One command-line flag per field of the dataclass `cls`, typed by its default, in the
    --help groups its knobs open (grouped=False: all in `parser`, which may be a group);
    `only`: the fields to offer.

    A yes/no knob shows the flag that changes it (--demo, --no-flip); its twin (--no-demo,
    --flip) is still accepted, for scripts written before, but not shown."""
    short = {int: "N", float: "X", str: "S"}
    title, g = None, parser
    for f in fields(cls):
        if grouped and f.metadata.get("group"):
            title, g = f.metadata["group"], None  # made at its first field offered
        if only is not None and f.name not in only:
            continue
        g = g or parser.add_argument_group(title)
        name, help, choices = f.name, f.metadata["help"], f.metadata["choices"]
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


# Keys config.json holds beside the knobs: what ran (run.write_run_folder), never read back
RAN = {"git_commit", "git_dirty", "torch", "arithmetic", "ranks"}


def saved_config(parser, args, cls):
    """--config FILE: the knobs (fields of `cls`) of a run's config.json (or of a file written
    by hand), less those that would make it that run again (its name, resume, overwrite) or tie
    it to its machine (device), and the config; a div_final that was div x 1e4 (the default,
    which config.json saves resolved) is left to follow --div.

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
    knobs = {f.name: f.default for f in fields(cls)}
    kept, problems = {}, []
    for k, v in saved.items():
        if k not in knobs and k not in RAN:
            near = difflib.get_close_matches(k, knobs, 1)
            problems.append(f"{k!r}: not a knob" + (f" (did you mean {near[0]!r}?)"
                                                    if near else ""))
        elif k in knobs and k not in ("name", "resume", "overwrite", "device", "config"):
            value, why = as_flag(v, knobs[k])
            if why:
                problems.append(f"{k!r}: {v!r} {why}")
            else:
                kept[k] = value
    if problems:
        parser.error("\n  ".join([f"--config {args.config}: {len(problems)} value(s) to fix:"]
                                 + problems))
    if kept.get("div_final") == kept.get("div", PAPER.div) * 1e4:  # derived, not chosen:
        del kept["div_final"]  # derived again, so that --div moves the final LR as it would
    return kept


def as_flag(v, default):
    """A JSON value as the knob whose default is `default` takes it: (value, None), or (None,
    what is wrong). Text is the command line's: 16 -> "16", [128, 224] -> "128,224"."""
    if isinstance(default, bool):
        return (v, None) if isinstance(v, bool) else (None, "is not true or false")
    scalars = (str, int, float)  # JSON's text and numbers; type(): a bool is not an int here
    if isinstance(default, str):
        if isinstance(v, list) and v and all(type(x) in scalars for x in v):
            return ",".join(str(x) for x in v), None
        if type(v) in scalars:
            return str(v), None
        return None, "is not text, a number or a list of them"
    try:  # a number knob: a number, or its text; never a fraction cut to an integer
        if type(v) not in scalars or (
                isinstance(default, int) and isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return type(default)(v), None
    except ValueError:
        return None, f"is not {'an integer' if isinstance(default, int) else 'a number'}"


# MaxLR.parse raises a ValueError for a bad LR form; every MaxLR it returns is true
LRS = (MaxLR.parse, bool, "auto, an LR (1e-3), :x (1e-4 for the body, 1e-3 for the head: "
       ":1e-3) or lo:hi (1e-6:1e-4)")
LISTS = {  # flag: (conversion, test, what it accepts)
    "stages": (int, lambda v: v >= 8, "image sizes of at least 8 px"),
    "frozen_epochs": (int, lambda v: v >= 0, "epoch counts (0 or more)"),
    "unfrozen_epochs": (int, lambda v: v >= 0, "epoch counts (0 or more)"),
    "batch_size": (int, lambda v: v >= 1, "batch sizes (1 or more)"),
    "lr_frozen": LRS,
    "lr_unfrozen": LRS,
}
RANGES = {  # flag: (test, what it accepts)
    "phantoms": (lambda v: v >= 8, "at least 8 films"),
    "hide_box": (lambda v: BOX[0] <= v <= BOX[1], f"a share of each side of {BOX[0]} to {BOX[1]}"),
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


def validate(cfg):
    """Everything wrong with the flags, one message each naming the flag and what it accepts,
    before any work is done ([] when all is well)."""
    problems, n_stages = [], None
    for name, (conv, ok, what) in LISTS.items():
        value = getattr(cfg, name)
        try:
            vals = [conv(v) for v in str(value).split(",")]
        except ValueError:
            problems.append(f"{flag(name)} {value!r} is not a comma list of {what}")
            continue
        bad = [v for v in vals if not ok(v)]
        if bad:
            problems.append(f"{flag(name)} {bad[0]!r} in {value!r}: give {what}")
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
    for name in ("train_split", "test_split", "subtypes", "image_dir"):  # must exist if given
        path, folder = getattr(cfg, name), name == "image_dir"
        if path and name.endswith("split") and cfg.data != "phantom":  # read from --data
            path = os.path.join(cfg.data, path)  # (an absolute path stays as it is)
        if path and not (os.path.isdir(path) if folder else os.path.isfile(path)):
            problems.append(f"{flag(name)} {path}: no such {'folder' if folder else 'file'}")
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
