"""Benchmark: how close training runs to the raw ResNet-50 step ceiling, and what the paper's
41-epoch schedule costs end to end, measured in one process on one device.

    python bench.py                    # CUDA: everything, about 10 minutes on one H100
    python bench.py --quick            # tiny sizes on the CPU in seconds: checks the script

(a) ceiling: the project's model, optimizer and precision on a synthetic batch already on the
    device, eager and compiled, per stage size and phase (frozen: head + BN; unfrozen: all);
(b) real: the training loop's own batches (uint8 cache on the device, augmentation) and step;
(c) end to end: train.py's default schedule on phantom PNGs of COVIDx v1's size (5,310 train /
    639 test), from a cold and then a warm cache, split into setup (decoding or cache),
    LR finders, first steps (autotuning, compilation), training and evaluation;
(d) peak GPU memory per stage, and the CPU cache build rate for 1024 px 8-bit PNGs.
Prints one table with (b)/(a) and writes JSON (--out). Results: BENCHMARKS.md.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import data
import films
import phantom
import train
from model import set_body_frozen
from config import Config, add_flags, knob


@dataclass
class BenchConfig:
    device: str = knob("auto", "auto | cpu | cuda")
    sizes: str = knob("128,224,229", "stage sizes")
    batch_size: int = knob(64, "batch size, as training uses it")
    arch: str = knob("resnet50", "ResNet body")
    steps: int = knob(25, "timed steps per measurement")
    warmup: int = knob(5, "untimed steps before each measurement")
    compile: bool = knob(True, "also measure the compiled ceiling and real loop")
    e2e_sets: str = knob("5310:639", "train:test sizes of the end-to-end runs, comma separated")
    png_size: int = knob(1024, "size of the phantom PNGs written for (c) and (d)")
    cache_images: int = knob(512, "PNGs decoded for the cache build rate")
    out: str = knob("bench.json", "JSON results")
    quick: bool = knob(False, "tiny sizes on the CPU, seconds: a check that the script works")


QUICK = dict(device="cpu", sizes="32,40", batch_size=8, arch="resnet18", steps=2, warmup=1,
             compile=False, e2e_sets="32:16", png_size=96, cache_images=16)


def timed(run, fn, n):
    """Seconds per call of fn over n calls, the device drained before and after."""
    train.sync(run)
    t0 = time.time()
    for _ in range(n):
        fn()
    train.sync(run)
    return (time.time() - t0) / n


def throughput(run, bc, size, frozen, forward):
    """(ceiling img/s, real img/s) for one stage size and phase with the given forward."""
    run.forward = forward
    set_body_frozen(run.model, frozen)
    cl = torch.channels_last if run.device.type == "cuda" else torch.contiguous_format
    x = torch.randn(bc.batch_size, 3, size, size, device=run.device).contiguous(memory_format=cl)
    y = torch.randint(0, len(run.classes), (bc.batch_size,), device=run.device)
    for _ in range(bc.warmup):
        run.step(x, y)
    ceiling = bc.batch_size / timed(run, lambda: run.step(x, y), bc.steps)

    batches = train.train_batches(run, train.stage_tensors(run, size), size, bc.batch_size,
                                  "bench")
    it = iter(batches)

    def real_step():
        nonlocal it
        try:
            xb, yb = next(it)
        except StopIteration:  # a new epoch: new order, as in training
            it = iter(batches)
            xb, yb = next(it)
        run.step(xb, yb)
    for _ in range(bc.warmup):
        real_step()
    real = bc.batch_size / timed(run, real_step, bc.steps)
    return ceiling, real


def measure_steps(bc, dev):
    """(a), (b) and peak memory for every stage size and phase."""
    sizes = [int(s) for s in bc.sizes.split(",")]
    n_train = max(bc.batch_size * (bc.steps + bc.warmup), 64)
    cfg = Config(data="phantom", phantoms=n_train, arch=bc.arch, weights="none",
                       device=dev, stages=bc.sizes, frozen_epochs="0", unfrozen_epochs="1",
                       batch_size=str(bc.batch_size), runs=tempfile.mkdtemp(), cache_dir="",
                       compile="off")
    run = train.setup(cfg)
    if bc.compile:
        run.compiled = torch.compile(run.model, dynamic=False)
    rows = []
    for size in sizes:
        for phase in ("frozen", "unfrozen"):
            row = {"size": size, "phase": phase}
            for mode in ["eager"] + (["compiled"] if bc.compile else []):
                fwd = run.compiled if mode == "compiled" else run.model
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                row[f"ceiling_{mode}"], row[f"real_{mode}"] = throughput(
                    run, bc, size, phase == "frozen", fwd)
                row[f"wall_{mode}_s"] = time.time() - t0  # includes compilation
                if dev == "cuda":
                    row[f"peak_gib_{mode}"] = torch.cuda.max_memory_allocated() / 2 ** 30
            best = max(row.get("ceiling_eager", 0), row.get("ceiling_compiled", 0))
            # training compiles a stage only where compile_pays(); it is eager otherwise
            row["ratio"] = row["real_eager"] / best
            if bc.compile:
                row["ratio_compiled"] = row["real_compiled"] / best
            rows.append(row)
    return rows


def end_to_end(bc, dev, root, n_train, n_test):
    """(c): train.py's default schedule on PNG files, from a cold and then a warm cache."""
    out = {}
    cache = tempfile.mkdtemp()
    for cache_state in ("cold", "warm"):
        cfg = Config(data=root, weights="none", arch=bc.arch, device=dev,
                           stages=bc.sizes, batch_size=str(bc.batch_size), cache_dir=cache,
                           runs=tempfile.mkdtemp(), name=cache_state)
        if bc.quick:  # one epoch per stage, short LR sweeps
            cfg.frozen_epochs, cfg.unfrozen_epochs, cfg.lr_find_steps = "1", "1", 4
        m = train.main(cfg)
        out[cache_state] = {**m["timings_s"], "accuracy": m["accuracy"]["value"]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, BenchConfig)
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    bc = BenchConfig(**vars(args))
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if bc.device == "auto" \
        else bc.device
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor()
           or platform.machine(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d"), "config": asdict(bc)}
    print(json.dumps(env))
    steps = measure_steps(bc, dev)

    results = {"env": env, "steps": steps, "e2e": {}}
    for spec in bc.e2e_sets.split(","):
        n_train, n_test = (int(v) for v in spec.split(":"))
        root = tempfile.mkdtemp()
        t0 = time.time()
        phantom.write_covidx(root, n_train, n_test, bc.png_size)
        results["e2e"][spec] = {"write_pngs_s": time.time() - t0,
                                **end_to_end(bc, dev, root, n_train, n_test)}
        if "cache_rate" not in results:  # (d): decoding alone, all cores, no cache
            _, splits = data.load_dataset(root)
            items = splits["train"].subset(range(min(bc.cache_images, n_train)))
            t0 = time.time()
            films.load_pixels(items, [int(s) for s in bc.sizes.split(",")], cache_dir=None)
            rate = len(items) / (time.time() - t0)
            results["cache_rate"] = {"images_s": rate, "per_core": rate / os.cpu_count(),
                                     "png_px": bc.png_size, "images": len(items)}
    with open(bc.out, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))
    return results


def report(r):
    """The results as the tables BENCHMARKS.md shows."""
    modes = ["eager"] + (["compiled"] if "ceiling_compiled" in r["steps"][0] else [])
    lines = [f"{r['env']['device']}, torch {r['env']['torch']}, {r['env']['date']}", "",
             "| size | phase | " + " | ".join(f"ceiling {m} img/s | real {m} img/s"
                                             for m in modes) + " | (b)/(a) |",
             "|---" * (3 + 2 * len(modes)) + "|"]
    for s in r["steps"]:
        cells = " | ".join(f"{s['ceiling_' + m]:,.0f} | {s['real_' + m]:,.0f}" for m in modes)
        lines.append(f"| {s['size']} | {s['phase']} | {cells} | {s['ratio']:.3f} |")
    lines += ["", "| set (train:test) | cache | setup s | LR finders s | first steps s | "
              "training s | evaluation s | total s |", "|---" * 8 + "|"]
    for spec, e in r["e2e"].items():
        for state in ("cold", "warm"):
            t = e[state]
            lines.append(f"| {spec} | {state} | {t['setup']:.1f} | {t.get('lr_find', 0):.1f} | "
                         f"{t.get('first_steps', 0):.1f} | {t['train']:.1f} | {t['eval']:.1f} "
                         f"| {t['total']:.1f} |")
    c = r["cache_rate"]
    lines += ["", f"cache build: {c['images_s']:.0f} images/s on {r['env']['cpus']} cores "
                  f"({c['per_core']:.0f} per core), {c['png_px']} px 8-bit PNG"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
