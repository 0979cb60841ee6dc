"""Benchmark: how close training runs to the raw ResNet-50 step ceiling, what the paper's
41-epoch schedule costs end to end, and, first of all on a new GPU, whether the CUDA path works.

    python3 bench.py --gpu-check       # the first command on a new GPU: within --budget (520 s)
    python bench.py --part loop        # one part per call (each under 10 minutes on one H100)
    python bench.py                    # every part, one after another (~20 minutes on one H100)
    python bench.py --quick            # tiny sizes on the CPU in seconds: checks the script
    python bench.py --ddp 8            # data-parallel: torchrun on 8 GPUs against 1, and as run

Parts (--part, comma separated; results merged into --out across calls, written after each
measurement, so a killed call keeps what it measured):
  ceiling     (a) the project's model, optimizer and precision on a synthetic batch already on
              the device, per stage size and phase (frozen: head + BN; unfrozen: all), in each
              of --modes (eager, compiled), with peak GPU memory;
  loop        (b) the training loop's own batches (uint8 films on the device, augmentation) and
              step, with (a) measured again beside it: (b)/(a) in one process;
  checkpoint  the cost of one epoch's snapshot and last.pt write (machinery/checkpoint.py),
              against a deep copy and a synchronous save as train.py did before;
  e2e         (c) train.py's default schedule on phantom PNGs of COVIDx v1's size (5,310 train /
              639 test), from a cold and then a warm cache, split into setup (decoding or
              cache), LR finders, first steps (autotuning, compilation), training and evaluation;
  cache       (d) the CPU cache build rate for 1024 px 8-bit PNGs.
--gpu-check runs train.py, evaluate.py and predict.py as a user would, on the device
(benchmarks/gpucheck.py); BENCHMARKS.md says what healthy output looks like. The measurements
themselves are in benchmarks/measure.py.
"""
import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import torch

import data
import train
from machinery import devices
from machinery.flags import Help, add_flags
from benchmarks.gpucheck import gpu_check, require_cuda
from benchmarks.measure import (PARTS, QUICK, BenchConfig, Recipe, Results, cache_rate,
                               checkpoint_cost, ddp_scaling, end_to_end, measure_steps,
                               remove_scratch, step_run)
from machinery.run import git_commit


def stage_batches(run, size, batch_size):
    """A stage's training batches, as train.py draws them (data.py)."""
    return data.train_batches(run, data.stage_films(run, size)["train"], size, batch_size,
                              "bench")


RECIPE = Recipe(train_main=train.main, batches=stage_batches)  # what the steps time


def run_parts(bc, dev, res):
    for part in bc.part.split(","):
        t0 = time.time()
        print(f"\n== {part}")
        if part in ("ceiling", "loop"):
            measure_steps(bc, dev, res, part, RECIPE)
        elif part == "checkpoint":
            res.set("checkpoint", checkpoint_cost(step_run(bc, dev, 64)))
        elif part == "e2e":
            for spec in bc.e2e_sets.split(","):
                res.set("e2e", {**res.r.get("e2e", {}), spec: end_to_end(bc, dev, spec, RECIPE)})
        elif part == "cache":
            res.set("cache_rate", cache_rate(bc))
        else:
            raise SystemExit(f"--part {part}: choose from {', '.join(PARTS)}")
        print(f"== {part}: {time.time() - t0:.0f} s")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s [flags below]")
    add_flags(p, BenchConfig)
    return p


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    bc = BenchConfig(**vars(args))
    if bc.ddp and (bc.ddp < 2 or bc.ddp_steps < 1 or bc.gpu_check):
        p.error(f"--ddp {bc.ddp} --ddp-steps {bc.ddp_steps}: give 2 ranks or more, 1 step or "
                "more, and not with --gpu-check (one call each)")
    if bc.gpu_check:
        require_cuda(bc)  # a check on the CPU would spend the GPU's lease
    dev = devices.pick_device(bc.device)
    if bc.ddp and dev.type == "cuda" and torch.cuda.device_count() < bc.ddp:
        raise SystemExit(f"--ddp {bc.ddp}: this machine has {torch.cuda.device_count()} GPU(s)")
    out = bc.out or ("gpu_check.json" if bc.gpu_check else "bench.json")
    env = {"device": devices.describe(dev), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "git_commit": git_commit(), "config": asdict(bc)}
    print(json.dumps(env))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    res = Results(out, env)
    log = os.path.splitext(out)[0] + ".log"  # --gpu-check's and --ddp's scripts' output
    try:
        if bc.gpu_check or bc.ddp:
            open(log, "w").close()  # every script's output, one by one, from this call
        if bc.gpu_check:
            gpu_check(bc, dev, res, log)
        elif bc.ddp:
            res.add_row("ddp", ddp_scaling(bc, dev, bc.ddp, log),
                        key=("ranks", "size", "batch_per_rank"))
        else:
            run_parts(bc, dev, res)
        if not bc.gpu_check:
            print("\n" + report(res.r))
    finally:
        remove_scratch()  # the runs, caches and PNGs measured on: GBs nobody reads
    return res.r


def report(r):
    """The results as the tables BENCHMARKS.md shows (whatever parts the file holds)."""
    lines = [f"{r['env']['device']}, torch {r['env']['torch']}, {r['env']['date']}"]
    for part in ("ceiling", "loop"):
        loop = part == "loop"  # (b) and (b)/(a) beside (a)
        if r.get(part):
            lines += ["", f"{part}, batch {r[part][0]['batch']}:", "",
                      "| size | phase | mode | ceiling img/s |" +
                      (" real img/s | (b)/(a) |" if loop else "") + " peak GiB |",
                      "|---" * (7 if loop else 5) + "|"]
            for s in r[part]:
                real = f" {s['real']:,.0f} | {s['ratio']:.3f} |" if loop else ""
                peak = f"{s['peak_gib']:.1f}" if s.get("peak_gib") is not None else "-"
                lines.append(f"| {s['size']} | {s['phase']} | {s['mode']} | "
                             f"{s['ceiling']:,.0f} |{real} {peak} |")
    if c := r.get("checkpoint"):
        lines += ["", f"checkpoint ({c['mib']:.0f} MiB): snapshot {c['snapshot_s'] * 1e3:.0f} "
                      f"ms in the training thread, write {c['write_s']:.2f} s in the "
                      f"background (before: {c['before_s']:.2f} s in the training thread)"]
    if r.get("e2e"):
        lines += ["", "| set (train:test) | cache | setup s | LR finders s | first steps s | "
                  "training s | evaluation s | checkpoints s | total s |", "|---" * 9 + "|"]
        for spec, e in r["e2e"].items():
            for state in ("cold", "warm"):
                t = e[state]
                lines.append(f"| {spec} | {state} | {t['setup']:.1f} | "
                             f"{t.get('lr_find', 0):.1f} | {t.get('first_steps', 0):.1f} | "
                             f"{t['train']:.1f} | {t['eval']:.1f} | "
                             f"{t.get('checkpoint', 0):.1f} | {t['total']:.1f} |")
    if r.get("ddp"):
        lines += ["", "| ranks | size | batch per rank | img/s, 1 rank | img/s, all ranks | "
                  "img/s per rank | scaling efficiency |", "|---" * 7 + "|"]
        for d in r["ddp"]:
            n = d["ranks"]
            lines.append(f"| {n} | {d['size']} | {d['batch_per_rank']} | {d['img_s_1']:,.0f} | "
                         f"{d[f'img_s_{n}']:,.0f} | {d['img_s_per_rank']:,.0f} | "
                         f"{d['efficiency']:.2f} |")
        as_run = [d for d in r["ddp"] if d.get("as_run")]  # rows measured before have none
        if as_run:  # the n ranks as a user runs them: validation and last.pt every epoch
            lines += ["", "as run (validation, last.pt every epoch), seconds per epoch:", "",
                      "| ranks | size | epoch s | steps s | validation s | checkpoint s | "
                      "img/s, steps | img/s, epoch |", "|---" * 8 + "|"]
            for d in as_run:
                e = d["as_run"]
                lines.append(f"| {d['ranks']} | {d['size']} | {e['epoch_s']:.2f} | "
                             f"{e['train_s']:.2f} | {e['val_s']:.2f} | {e['checkpoint_s']:.2f} "
                             f"| {e['img_s_steps']:,.0f} | {e['img_s']:,.0f} |")
    if c := r.get("cache_rate"):
        lines += ["", f"cache build: {c['images_s']:.0f} images/s on {r['env']['cpus']} cores "
                      f"({c['per_core']:.0f} per core), {c['png_px']} px 8-bit PNG"]
    return "\n".join(lines)


if __name__ == "__main__":
    r = main()  # exit status 1 when a step of --gpu-check failed or timed out
    sys.exit(any(v["status"] in ("failed", "timeout") for v in r.get("gpu_check", {}).values()))
