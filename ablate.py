"""Ablations: named variants of the recipe x seeds, one after another, then one comparison.

    python ablate.py --data PATH --seeds 0,1,2          # the paper and each technique taken out
    python ablate.py --demo --variants paper,no-lrfind --seeds 0,1,2 --out runs/abl
    python ablate.py --data PATH --variant wd0="--wd 0" --arch resnet18 --stages 64,96
    python ablate.py --data PATH --preset shortcut --seeds 0,1,2   # what comes from the lungs?

Every flag ablate.py does not know goes to train.py, for every run. A variant is a name and
the train.py flags it changes (listed at the end of --help; --variant NAME="--flag value ..."
adds one or replaces a built-in); --preset names a set of them. Runs go to
--out/<variant>-s<seed>/; a run that finished is skipped on a rerun, one that was killed is
continued (--resume), one that fails is reported and the others go on. At the end
compare.py's tables (compare.md, .csv, .json, .png) are written to --out.

Each run is its own `python train.py` process: a crash, an out-of-memory or a hang in one
cannot take the others down, every run starts from fresh global state (random generators,
cuDNN's autotuner, torch.compile's caches, GPU memory), and a killed run resumes exactly as a
user's would. It costs a few seconds per run.
"""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from tqdm import tqdm

import compare
from machinery import runlock
from machinery.config import make_stages, parse_args
from machinery.flags import Help

ROOT = os.path.dirname(os.path.abspath(__file__))
# name -> train.py flags. {placeholders} are filled from the base run's stages:
#   {last_size_each}    the last stage's size for every stage (e.g. 229,229,229)
#   {fixed_lr_frozen}, {fixed_lr_unfrozen}: each 'auto' LR replaced by fastai v1's default
#                       max_lr, slice(3e-3) (:3e-3: 3e-4 for the body's groups, 3e-3 for the
#                       head); explicit LRs kept
#   {epochs_unfrozen}   each stage's head-only epochs added to its all-layer ones
VARIANTS = {
    "paper": "",
    "no-progressive": "--stages {last_size_each}",
    "no-lrfind": "--lr-frozen {fixed_lr_frozen} --lr-unfrozen {fixed_lr_unfrozen}",
    "no-discriminative": "--no-discriminative",
    "no-freeze": "--frozen-epochs 0 --unfrozen-epochs {epochs_unfrozen}",
    "fastai-v1": "--recipe fastai-v1",
    "fastai-v2": "--recipe fastai-v2",
    # shortcut tests (docs/data.md): the same recipe on films with a box of each blacked out
    "whole-films": "--hide none",
    "lungs-hidden": "--hide lungs",
    "lungs-alone": "--hide outside",
}
ABOUT = {  # what each variant changes, for --help
    "paper": "the recipe as the other flags give it",
    "no-progressive": "every stage at the last stage's size, with the same epochs",
    "no-lrfind": "each 'auto' LR replaced by fastai v1's default max_lr, slice(3e-3)",
    "no-discriminative": "one LR for all layer groups",
    "no-freeze": "no head-only phases: their epochs train all layers (the same 41 epochs)",
    "fastai-v1": "fastai v1's recipe where it differs from the paper's (FIDELITY.md)",
    "fastai-v2": "fastai v2's defaults",
    "whole-films": "whole films, whatever the base flags hide: the shortcut tests' reference",
    "lungs-hidden": "each film's central box blacked out: its border alone, no lungs",
    "lungs-alone": "all but the central box blacked out: no border, markers or shoulders",
}
PRESETS = {  # --preset: the variants it runs
    # the paper's recipe, and each of its techniques taken out
    "techniques": "paper,no-progressive,no-lrfind,no-discriminative,no-freeze",
    # how much of the score comes from the lungs: whole films, and each box blacked out;
    # compare.md sets them against each other (paired) and against chance
    "shortcut": "whole-films,lungs-hidden,lungs-alone",
}


def placeholders(cfg):
    """The values of VARIANTS' {placeholders}, from the base run's stages."""
    stages = make_stages(cfg)
    fix = lambda spec, lr: lr if spec == "auto" else spec
    return {"last_size_each": ",".join([str(stages[-1].size)] * len(stages)),
            "fixed_lr_frozen": ",".join(fix(s.lr_frozen, ":3e-3") for s in stages),
            "fixed_lr_unfrozen": ",".join(fix(s.lr_unfrozen, ":3e-3") for s in stages),
            "epochs_unfrozen": ",".join(str(s.frozen_epochs + s.unfrozen_epochs) for s in stages)}


def variants_help():
    """--help's list of the variants: each one's train.py flags and what they change."""
    lines = ["variants (--variants, --preset): the train.py flags each adds ({...}: filled",
             "from the base flags' stages), and what they change:"]
    for name, flags in VARIANTS.items():
        lines += [f"  {name:<18} {flags or '(none)'}", f"  {'':<18} {ABOUT.get(name, '')}"]
    return "\n".join(lines)


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,  # --seed is train's
                                formatter_class=Help, epilog=variants_help(),
                                usage="%(prog)s [--demo | --data PATH] [flags below] "
                                "[train.py's flags]")
    p.add_argument("--preset", default="", choices=["", *PRESETS], metavar="{" + ",".join(
        PRESETS) + "}", help="a set of variants: " + "; ".join(
            f"{k}: {v}" for k, v in PRESETS.items()) + " (default: techniques)")
    p.add_argument("--variants", default="", metavar="NAME,..",
                   help="variants (listed below), comma separated, instead of a preset's (then "
                   "each --variant)")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="a variant of your own: its name and train.py flags (repeatable) "
                   "(default: none)")
    p.add_argument("--seeds", default="0,1,2", metavar="N,..", help="seeds, comma separated")
    p.add_argument("--out", default="", metavar="DIR",
                   help="folder for the runs and the comparison (default: runs/ablation-<data>, "
                   "runs/shortcut-<data>); a rerun with the same --out goes on")
    p.add_argument("--ref", default="", metavar="NAME",
                   help="reference variant (default: the first)")
    return p


def parse(argv=None):
    p = make_parser()
    a, base = p.parse_known_args(argv)
    table = dict(VARIANTS)
    mine = []
    for v in a.variant:
        if "=" not in v:
            p.error(f"--variant {v}: give NAME=\"--flag value ...\"")
        name, flags = v.split("=", 1)
        table[name.strip()] = flags
        mine.append(name.strip())
    if a.preset and a.variants:
        p.error(f"--preset {a.preset} --variants {a.variants}: give one (and --variant for "
                "more)")
    names = [n for n in (a.variants or PRESETS[a.preset or "techniques"]).split(",") if n]
    names += [n for n in mine if n not in names]
    if len(set(names)) < len(names):
        p.error(f"--variants {a.variants}: a variant named twice would count its runs twice")
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}: the built-in ones are "
                f"{', '.join(VARIANTS)}; add your own with --variant NAME=\"--flag value\"")
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {a.seeds}: give integers, comma separated")
    if len(set(seeds)) < len(seeds):
        p.error(f"--seeds {a.seeds}: a seed given twice would count its runs twice")
    if a.ref and a.ref not in names:
        p.error(f"--ref {a.ref}: not among the variants ({', '.join(names)})")
    reserved = ("--seed", "--name", "--runs", "--resume")
    if any(b.split("=")[0] in reserved for b in base):
        p.error("--seed, --name, --runs and --resume are set by ablate.py for each run "
                "(use --seeds and --out)")
    base_cfg = parse_args(base)  # every train.py flag checked once, before any run
    kind = "shortcut" if a.preset == "shortcut" else "ablation"  # the folder's name
    out = a.out or os.path.join(base_cfg.runs, f"{kind}-" + os.path.basename(
        os.path.normpath(base_cfg.data or "data")))
    out = os.path.abspath(out)  # train.py runs in this process's folder, state() looks there
    flags, fill = {}, placeholders(base_cfg)
    for name in names:  # each variant's train.py flags on top of the base flags
        try:
            flags[name] = shlex.split(table[name].format_map(fill))
        except (KeyError, IndexError, ValueError) as e:
            p.error(f"variant {name}: {table[name]!r} has an unknown placeholder ({e})")
    runs = []
    for seed in seeds:  # seed by seed: stopped part-way, the variants still pair up
        for name in names:
            args = [*base, *flags[name], "--seed", str(seed), "--runs", out,
                    "--name", f"{name}-s{seed}"]
            try:
                cfg = parse_args(args)
            except SystemExit:
                p.error(f"variant {name}: train.py {' '.join(flags[name])} does not parse "
                        "(above)")
            if cfg.resume:
                p.error(f"variant {name}: --resume is set by ablate.py for killed runs")
            runs.append({"variant": name, "seed": seed, "args": args, "config": cfg,
                         "dir": os.path.join(out, f"{name}-s{seed}")})
    return runs, {n: table[n] for n in names}, out, a.ref or names[0]


def state(run_dir):
    """done (test metrics and predictions written), killed (last.pt, not done), started (a
    run folder without a checkpoint), lrfind (lrfind.py's folder), or new."""
    if os.path.isfile(os.path.join(run_dir, "lrfind.json")):
        return "lrfind"
    if all(os.path.isfile(os.path.join(run_dir, f))
           for f in ("test_metrics.json", "test_predictions.csv")):
        return "done"
    if os.path.isfile(os.path.join(run_dir, "last.pt")):
        return "killed"
    return "started" if os.path.isfile(os.path.join(run_dir, "config.json")) else "new"


def changed(r):
    """The config keys in which the run already in r's folder differs from r's (machine and
    bookkeeping keys aside); {} when it is the same run, or there is none yet."""
    path = os.path.join(r["dir"], "config.json")
    if not os.path.isfile(path):
        return {}
    # keys older runs lack: the defaults they ran with
    saved = {**compare.DEFAULTS, **json.load(open(path))}
    return {k: (saved.get(k), v) for k, v in dataclasses.asdict(r["config"]).items()
            if k not in compare.IGNORED and saved.get(k) != v}  # the keys compare.py ignores


def run_one(r, log_dir):
    """Run, resume or skip one variant x seed; (status, seconds, log path)."""
    st = state(r["dir"])
    if st == "done":
        return "skipped (done before)", 0.0, None
    if st == "lrfind":  # someone's LR range test: never written over
        return f"failed ({r['dir']} holds an LR finder's folder: move it)", 0.0, None
    train = os.path.join(ROOT, "train.py")
    cmd = [sys.executable, train, "--resume", r["dir"]] if st == "killed" else \
        [sys.executable, train, *r["args"], *(["--overwrite"] if st == "started" else [])]
    log = os.path.join(log_dir, os.path.basename(r["dir"]) + ".log")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc == 0 and state(r["dir"]) != "done":
        rc = "no test metrics"
    status = ("resumed" if st == "killed" else "done") if rc == 0 else f"failed (exit {rc})"
    return status, time.time() - t0, log


def main(argv=None):
    runs, variants, out, ref = parse(argv)
    names = list(variants)
    runlock.refuse_if_held(out, "--out")  # another ablate.py writes there: before any work
    stale = {os.path.basename(r["dir"]): changed(r) for r in runs}
    stale = {k: v for k, v in stale.items() if v}
    if stale:  # another ablation's runs, or this one's with other flags: never mixed in
        k, v = next(iter(stale.items()))
        raise SystemExit(f"{out} holds runs made with other flags ({len(stale)}, e.g. {k}: " +
                         ", ".join(f"{key} {old!r} there, {new!r} now" for key, (old, new)
                                   in list(v.items())[:3]) + "); choose another --out")
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    runlock.hold(out, "--out")  # this ablation's runs, logs and tables: this process's alone
    print(f"{len(runs)} runs ({len(names)} variants x {len(runs) // len(names)} seeds) in "
          f"{out}")
    results = []
    # the runs done before are said first: the bar and its ETA are over the runs still to run
    running = [state(r["dir"]) != "done" for r in runs]
    bar = tqdm(total=sum(running), unit="run", desc="ablation", disable=None)  # terminals only
    for k in sorted(range(len(runs)), key=running.__getitem__):
        r = runs[k]
        if running[k]:
            bar.set_postfix_str(f"{r['variant']} seed {r['seed']}")
        status, secs, log = run_one(r, log_dir)
        bar.update(running[k])
        line = f"[{k + 1}/{len(runs)}] {r['variant']} seed {r['seed']}: {status}"
        if status.startswith("failed") and log:  # a failed start (an LR finder's folder): no log
            with open(log, errors="replace") as f:
                last = [s for s in f.read().splitlines() if s.strip()][-3:]
            line += f", {secs:.0f} s; its log ends:\n    " + "\n    ".join(last) + \
                f"\n    (whole log: {log})"
        elif not status.startswith("failed"):
            m = json.load(open(os.path.join(r["dir"], "test_metrics.json")))
            line += f", test accuracy {100 * m['accuracy']['value']:.1f}%" + \
                (f", {secs:.0f} s" if secs else "")
        tqdm.write(line)
        results.append({key: v for key, v in r.items() if key != "config"} |
                       {"status": status, "seconds": secs})
    bar.close()
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump({"variants": variants, "runs": results}, f, indent=1)
    groups = {n: [r["dir"] for r in results if r["variant"] == n and state(r["dir"]) == "done"]
              for n in names}
    groups = {n: rs for n, rs in groups.items() if rs}
    failed = [f"{r['variant']}-s{r['seed']}" for r in results if r["status"].startswith("failed")]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; the comparison leaves them "
              "out (rerun the same command to retry them)")
    if not groups:
        raise SystemExit("no finished runs: nothing to compare")
    if ref not in groups:
        print(f"no finished run of the reference variant {ref}: the differences are taken "
              f"against {next(iter(groups))}")
        ref = next(iter(groups))
    print()
    try:
        rows = compare.report(groups, out, ref, title=f"Ablation: {', '.join(groups)}")
    except compare.CompareError as e:
        raise SystemExit(f"error: {e}")
    if failed:
        raise SystemExit(1)  # the comparison is written; the exit status says not all ran
    return rows


if __name__ == "__main__":
    main()
