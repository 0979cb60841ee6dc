"""Benchmark: how close training runs to the raw ResNet-50 step ceiling, what the paper's
41-epoch schedule costs end to end, and, first of all on a new GPU, whether the CUDA path works.

    python bench.py --gpu-check        # the first command on a new GPU: ~8 minutes on one H100
    python bench.py --part loop        # one part per call (each under 10 minutes on one H100)
    python bench.py                    # every part, one after another (~20 minutes on one H100)
    python bench.py --quick            # tiny sizes on the CPU in seconds: checks the script

Parts (--part, comma separated; results merged into --out across calls, written after each
measurement, so a killed call keeps what it measured):
  ceiling     (a) the project's model, optimizer and precision on a synthetic batch already on
              the device, per stage size and phase (frozen: head + BN; unfrozen: all), in each
              of --modes (eager, compiled), with peak GPU memory;
  loop        (b) the training loop's own batches (uint8 films on the device, augmentation) and
              step, with (a) measured again beside it: (b)/(a) in one process;
  checkpoint  the cost of one epoch's snapshot and last.pt write (checkpoint.Checkpointer),
              against a deep copy and a synchronous save as train.py did before;
  e2e         (c) train.py's default schedule on phantom PNGs of COVIDx v1's size (5,310 train /
              639 test), from a cold and then a warm cache, split into setup (decoding or
              cache), LR finders, first steps (autotuning, compilation), training and evaluation;
  cache       (d) the CPU cache build rate for 1024 px 8-bit PNGs.
--gpu-check runs train.py, evaluate.py and predict.py as a user would, on the device (see
gpu_check()); BENCHMARKS.md says what healthy output looks like.
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import data
import devices
import films
import phantom
import train
from checkpoint import Checkpointer, save_checkpoint
from config import Config, add_flags, knob
from model import set_body_frozen

ROOT = os.path.dirname(os.path.abspath(__file__))
PARTS = ("ceiling", "loop", "checkpoint", "e2e", "cache")


@dataclass
class BenchConfig:
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    part: str = knob(",".join(PARTS), "parts to run, comma separated: " + ", ".join(PARTS))
    gpu_check: bool = knob(False, "run the first-GPU check (train, resume, evaluate, predict, "
                           "ratios, memory, checkpoint cost) instead of the parts")
    budget: float = knob(480.0, "--gpu-check: seconds it may take; a step that would not fit "
                         "in what is left is skipped (its time limit is what is left)")
    sizes: str = knob("128,224,229", "stage sizes")
    batch_size: int = knob(64, "batch size, as training uses it")
    arch: str = knob("resnet50", "ResNet body")
    precision: str = knob("auto", "auto | bf16 | fp32 (as train.py)")
    channels_last: str = knob("auto", "auto | on | off (as train.py)")
    modes: str = knob("eager,compiled", "ceiling and loop: eager, compiled, or both")
    compile_backend: str = knob("inductor", "torch.compile backend (as train.py)")
    steps: int = knob(25, "timed steps per measurement")
    warmup: int = knob(5, "untimed steps before each measurement")
    e2e_sets: str = knob("5310:639", "train:test sizes of the end-to-end runs, comma separated")
    png_size: int = knob(1024, "size of the phantom PNGs written for e2e and cache")
    cache_images: int = knob(512, "PNGs decoded for the cache build rate")
    out: str = knob("", "JSON results, merged across calls (default: bench.json, or "
                    "gpu_check.json with --gpu-check, whose scripts' output goes to the same "
                    "name with .log)")
    quick: bool = knob(False, "tiny sizes on the CPU, seconds: a check that the script works")


QUICK = dict(device="cpu", sizes="32,40", batch_size=8, arch="resnet18", steps=2, warmup=1,
             modes="eager", e2e_sets="32:16", png_size=96, cache_images=16)


class Results:
    """The JSON file: read at the start (results of other calls on the same device and torch
    are kept), written again after every measurement."""

    def __init__(self, path, env):
        self.path, self.r = path, {"env": env}
        if os.path.isfile(path):
            old = json.load(open(path))
            same = {k: old.get("env", {}).get(k) for k in ("device", "torch")} == \
                {k: env[k] for k in ("device", "torch")}
            if same:
                self.r = {**old, "env": env}
            else:
                print(f"{path} holds results of another device or torch; starting it anew")

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


def timed(dev, fn, n):
    """Seconds per call of fn over n calls, the device drained before and after."""
    devices.sync(dev)
    t0 = time.time()
    for _ in range(n):
        fn()
    devices.sync(dev)
    return (time.time() - t0) / n


def step_run(bc, dev, n_train=None):
    """A train.setup() run on in-memory phantoms, for the step measurements."""
    n_train = n_train or max(bc.batch_size * (bc.steps + bc.warmup), 64)
    cfg = Config(data="phantom", phantoms=n_train, arch=bc.arch, weights="none",
                 device=str(dev), stages=bc.sizes, frozen_epochs="0", unfrozen_epochs="1",
                 batch_size=str(bc.batch_size), runs=tempfile.mkdtemp(), cache_dir="",
                 compile="off", precision=bc.precision, channels_last=bc.channels_last,
                 compile_backend=bc.compile_backend)
    return train.setup(cfg)


def ceiling(run, bc, size):
    """(a): img/s of the step on one synthetic batch already on the device."""
    cl = torch.channels_last if run.channels_last else torch.contiguous_format
    x = torch.randn(bc.batch_size, 3, size, size, device=run.device).contiguous(memory_format=cl)
    y = torch.randint(0, len(run.classes), (bc.batch_size,), device=run.device)
    for _ in range(bc.warmup):
        run.step(x, y)
    return bc.batch_size / timed(run.device, lambda: run.step(x, y), bc.steps)


def real_loop(run, bc, size):
    """(b): img/s of the step on the training loop's own batches, new epochs as needed."""
    batches = train.train_batches(run, train.stage_tensors(run, size), size, bc.batch_size,
                                  "bench")
    it, epoch = iter(batches.epoch(0)), 0

    def step():
        nonlocal it, epoch
        try:
            xb, yb = next(it)
        except StopIteration:  # a new epoch: new order, as in training
            epoch += 1
            it = iter(batches.epoch(epoch))
            xb, yb = next(it)
        run.step(xb, yb)
    for _ in range(bc.warmup):
        step()
    return bc.batch_size / timed(run.device, step, bc.steps)


def measure_steps(bc, dev, res, part, sizes=None, modes=None):
    """ceiling or loop: one row per size x phase x mode, saved as it is measured."""
    run = step_run(bc, dev)
    modes = modes or bc.modes.split(",")
    rows = []
    for mode in modes:
        if mode == "compiled":
            if run.compiled is None:
                run.compiled = torch.compile(run.model, dynamic=False,
                                             backend=bc.compile_backend)
        run.forward = run.compiled if mode == "compiled" else run.model
        for size in sizes or [int(s) for s in bc.sizes.split(",")]:
            for phase in ("frozen", "unfrozen"):
                set_body_frozen(run.model, phase == "frozen")
                devices.reset_peak(dev)
                t0 = time.time()
                row = {"size": size, "phase": phase, "mode": mode, "batch": bc.batch_size,
                       "ceiling": ceiling(run, bc, size)}
                if part == "loop":
                    row["real"] = real_loop(run, bc, size)
                    row["ratio"] = row["real"] / row["ceiling"]
                row["peak_gib"] = devices.peak_gib(dev)
                row["wall_s"] = time.time() - t0  # includes autotuning and compilation
                print(f"  {part} {size} px {phase:>8} {mode:>8}: ceiling {row['ceiling']:,.0f}"
                      + (f", real {row['real']:,.0f} img/s, (b)/(a) {row['ratio']:.3f}"
                         if part == "loop" else " img/s") + f" ({row['wall_s']:.0f} s)")
                res.add_row(part, row)
                rows.append(row)
    return rows


def checkpoint_cost(run, repeats=3):
    """One epoch's checkpoint work for run's model with a full Adam state: the snapshot
    (training waits for it: the copies are queued; on a GPU they finish in the background)
    and the last.pt write (in a background thread), against train.py before 2026-11-27:
    model and optimizer deep-copied on the device, then a synchronous save with fsync."""
    import copy
    x = torch.randn(2, 3, 64, 64, device=run.device)
    set_body_frozen(run.model, False)
    run.step(x, torch.zeros(2, dtype=torch.long, device=run.device))  # Adam's moments exist
    dev, path = run.device, os.path.join(run.dir, "last.pt")
    ck = Checkpointer(run, path)
    out = {"snapshot_s": [], "snapshot_done_s": [], "write_s": [], "before_s": []}
    for i in range(repeats):
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


def end_to_end(bc, dev, root, cache):
    """(c): train.py's default schedule on PNG files, from a cold and then a warm cache."""
    out = {}
    for cache_state in ("cold", "warm"):
        cfg = Config(data=root, weights="none", arch=bc.arch, device=str(dev),
                     stages=bc.sizes, batch_size=str(bc.batch_size), cache_dir=cache,
                     runs=tempfile.mkdtemp(), name=cache_state, precision=bc.precision,
                     channels_last=bc.channels_last, compile_backend=bc.compile_backend)
        if bc.quick:  # one epoch per stage, short LR sweeps
            cfg.frozen_epochs, cfg.unfrozen_epochs, cfg.lr_find_steps = "1", "1", 4
        m = train.main(cfg)
        out[cache_state] = {**m["timings_s"], "accuracy": m["accuracy"]["value"]}
    return out


def cache_rate(bc):
    """(d): decoding alone, all cores, no cache."""
    root = tempfile.mkdtemp()
    phantom.write_covidx(root, bc.cache_images, 4, bc.png_size)
    _, splits = data.load_dataset(root, allow_missing_class=True)
    t0 = time.time()
    films.load_pixels(splits["train"], [int(s) for s in bc.sizes.split(",")], cache_dir=None)
    rate = bc.cache_images / (time.time() - t0)
    return {"images_s": rate, "per_core": rate / os.cpu_count(), "png_px": bc.png_size,
            "images": bc.cache_images}


def run_parts(bc, dev, res):
    for part in bc.part.split(","):
        t0 = time.time()
        print(f"\n== {part}")
        if part in ("ceiling", "loop"):
            measure_steps(bc, dev, res, part)
        elif part == "checkpoint":
            res.set("checkpoint", checkpoint_cost(step_run(bc, dev, 64)))
        elif part == "e2e":
            for spec in bc.e2e_sets.split(","):
                n_train, n_test = (int(v) for v in spec.split(":"))
                root, t1 = tempfile.mkdtemp(), time.time()
                phantom.write_covidx(root, n_train, n_test, bc.png_size)
                e = {"write_pngs_s": time.time() - t1,
                     **end_to_end(bc, dev, root, tempfile.mkdtemp())}
                res.set("e2e", {**res.r.get("e2e", {}), spec: e})
        elif part == "cache":
            res.set("cache_rate", cache_rate(bc))
        else:
            raise SystemExit(f"--part {part}: choose from {', '.join(PARTS)}")
        print(f"== {part}: {time.time() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# The first-GPU check


def start(name, args, log, title):
    """Start one of the project's scripts as a user would, its output appended to `log`
    under a heading; (process, offset where its output begins)."""
    with open(log, "a") as f:
        f.write(f"\n===== {title}: python {name} {' '.join(map(str, args))}\n")
        offset = f.tell()
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, name), *map(str, args)],
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return p, offset


def output(log, offset):
    with open(log, errors="replace") as f:
        f.seek(offset)
        return f.read()


def script(name, args, log, timeout, title=None):
    """Run a script to its end, or kill it at `timeout` seconds.
    (exit code or 'timeout', seconds, what it printed)."""
    t0 = time.time()
    p, offset = start(name, args, log, title or name)
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = "timeout"
    return rc, time.time() - t0, output(log, offset)


def killed_and_resumed(args, runs, log, timeout, kill_after):
    """train.py killed (SIGKILL) once `kill_after` epochs are logged and last.pt exists,
    then --resume'd: it must go on from the last saved epoch and train each epoch once."""
    t0 = time.time()
    run_dir = os.path.join(runs, "real")
    metrics, last = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "last.pt")
    p, _ = start("train.py", [*args, "--runs", runs, "--name", "real"], log, "real run, killed")
    while p.poll() is None and time.time() - t0 < timeout:
        if os.path.isfile(metrics) and len(open(metrics).readlines()) >= kill_after and \
                os.path.isfile(last):
            break
        time.sleep(0.02)
    was_running = p.poll() is None
    if was_running:
        p.send_signal(signal.SIGKILL)
    p.wait()
    out = {"killed_rc": p.returncode, "killed_mid_run": was_running,
           "killed_after_s": time.time() - t0}
    if not os.path.isfile(last):
        return {**out, "status": "failed", "why": "no last.pt after the kill"}
    saved = len(torch.load(last, map_location="cpu", weights_only=True)["history"])
    rc, secs, text = script("train.py", ["--resume", run_dir], log,
                            timeout - (time.time() - t0), "real run, resumed")
    out.update(resume_rc=rc, resume_s=secs, epochs_in_last_pt=saved)
    if rc != 0:
        return {**out, "status": "timeout" if rc == "timeout" else "failed",
                "why": "the resumed run did not end well", "log_tail": text[-3000:]}
    m = json.load(open(os.path.join(run_dir, "test_metrics.json")))
    rows = [json.loads(line) for line in open(metrics)]
    phases = [(r["phase"], r["epoch"]) for r in rows]
    out.update(accuracy=m["accuracy"]["value"], timings=m["timings_s"],
               epochs=len(rows), each_epoch_once=len(set(phases)) == len(phases),
               resumed="resuming" in text,
               per_phase=[{k: r.get(k) for k in ("phase", "img_s", "time", "peak_gib")}
                          for r in rows])
    good = out["resumed"] and out["each_epoch_once"] and was_running
    return {"status": "ok" if good else "failed", **out}


def gpu_check(bc, dev, res, log):
    """The first run on a new GPU, in one call, within bc.budget seconds, in order of value:

    demo          the demo on the device, eager, as a user runs it (train.py --demo);
    evaluate      evaluate.py on that run: plain (it must reproduce train.py's test accuracy),
                  then fastai v1's TTA;
    real_run      ResNet-50 at 128/224/229 px on a few hundred phantom PNGs (decoding, cache),
                  one epoch per phase, killed with SIGKILL after two epochs and --resume'd;
    demo_compiled one stage of the demo with --compile on (frozen, unfrozen and evaluation
                  graphs: every kind of graph training compiles);
    predict       predict.py with Grad-CAM on the real run's test PNGs;
    steps         ceiling vs real loop per stage and phase, eager, with peak memory;
    checkpoint    the cost of one epoch's snapshot and last.pt write for ResNet-50 with Adam;
    steps_compiled  ceiling vs real loop compiled, at the first size.
    A step is skipped when less of the budget is left than it needs; its scripts are killed
    at the budget's end. Each result is written as soon as its step ends, and one that fails
    (or raises) does not stop the rest. Returns {step: result}; result["status"] is one of
    ok, failed, timeout, skipped.
    """
    t_end = time.time() + bc.budget
    left = lambda: t_end - time.time()
    flags = ["--device", str(dev), "--precision", bc.precision, "--channels-last",
             bc.channels_last]  # evaluate.py and predict.py take these three
    train_flags = [*flags, "--compile-backend", bc.compile_backend]
    demo = ["--demo", *train_flags]
    compiled = [*demo, "--stages", "64", "--frozen-epochs", "1", "--unfrozen-epochs", "2",
                "--compile", "on"]
    real = ["--arch", bc.arch, "--weights", "none", "--stages", bc.sizes,
            "--frozen-epochs", "1,1,0", "--unfrozen-epochs", "1,1,1", "--batch-size",
            str(bc.batch_size), "--lr-find-steps", "20", "--save-every", "0", *train_flags]
    n_real, png, n_eval = 384, 512, 640
    if bc.quick:  # seconds on a CPU: every step, nothing measured
        tiny = ["--phantoms", "96", "--stages", "32", "--frozen-epochs", "0",
                "--unfrozen-epochs", "2", "--lr-find-steps", "6", "--batch-size", "16"]
        demo, compiled = demo + tiny, compiled + tiny[:4] + tiny[6:]
        real[real.index("--frozen-epochs") + 1] = "1,0"
        real[real.index("--unfrozen-epochs") + 1] = "1,4"
        real[real.index("--lr-find-steps") + 1] = "6"
        n_real, png, n_eval = 96, 64, 96
    runs = tempfile.mkdtemp()
    pngs = os.path.join(runs, "pngs")
    status = {}

    def step(name, estimate, fn):
        """Run fn() -> result dict as step `name`, within the budget; record and print it."""
        if left() < estimate:
            out = {"status": "skipped", "why": f"{left():.0f} s of the budget left, it needs "
                                                f"about {estimate:.0f} s"}
        else:
            t0 = time.time()
            try:
                out = fn()
            except Exception as e:  # said, and the check goes on
                out = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
            out.setdefault("step_s", time.time() - t0)
        status[name] = out
        res.set("gpu_check", status)
        print(f"[{out['status']}] {name}: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()
            if k not in ("status", "log_tail", "timings", "per_phase")), flush=True)
        return out

    def ran(rc, text, **more):
        ok = "ok" if rc == 0 else "timeout" if rc == "timeout" else "failed"
        return {"status": ok, "rc": rc, **more, **({} if rc == 0 else
                                                    {"log_tail": text[-3000:]})}

    def train_run(name, args):
        rc, secs, text = script("train.py", [*args, "--runs", runs, "--name", name], log,
                                left(), name)
        out = ran(rc, text, wall_s=secs)
        if rc == 0:
            folder = os.path.join(runs, name)
            m = json.load(open(os.path.join(folder, "test_metrics.json")))
            rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
            out.update(accuracy=m["accuracy"]["value"], timings=m["timings_s"],
                       peak_gib=max((r.get("peak_gib") or 0 for r in rows), default=0))
        return out

    def evaluate(train_acc):
        ev = [os.path.join(runs, "demo"), "--data", "phantom", "--phantoms", n_eval, *flags]
        rc, secs, text = script("evaluate.py", [*ev, "--out", os.path.join(runs, "eval")],
                                log, left())
        out = ran(rc, text, wall_s=secs)
        if rc == 0:
            acc = json.load(open(os.path.join(runs, "eval", "metrics.json")))["accuracy"]
            out.update(accuracy=acc["value"], same_as_train=acc["value"] == train_acc)
            rc, secs, text = script("evaluate.py", [*ev, "--tta", "v1", "--out",
                                                    os.path.join(runs, "tta")], log, left(),
                                    "evaluate.py --tta v1")
            out.update(ran(rc, text, tta_s=secs))
            if rc == 0:
                out["tta_accuracy"] = json.load(open(os.path.join(
                    runs, "tta", "metrics.json")))["accuracy"]["value"]
        return out

    def real_run():
        t0 = time.time()
        phantom.write_covidx(pngs, n_real, n_real // 6, png)
        write_s = time.time() - t0
        args = ["--data", pngs, "--cache-dir", os.path.join(runs, "cache"), *real]
        return {**killed_and_resumed(args, runs, log, left(), 2), "write_pngs_s": write_s}

    def predict():
        rc, secs, text = script("predict.py", [
            os.path.join(runs, "demo"), os.path.join(pngs, "test"), "--out",
            os.path.join(runs, "pred.csv"), "--cam", os.path.join(runs, "cams"), *flags],
            log, left())
        out = ran(rc, text, wall_s=secs)
        if rc == 0:
            out["cams"] = len(os.listdir(os.path.join(runs, "cams")))
        return out

    def steps(b, sizes=None, modes=None):
        rows = measure_steps(b, dev, res, "loop", sizes, modes)
        return {"status": "ok", "min_ratio": min(r["ratio"] for r in rows),
                "peak_gib": max(r["peak_gib"] or 0 for r in rows)}

    eager = BenchConfig(**{**asdict(bc), "modes": "eager"})
    d = step("demo", 60, lambda: train_run("demo", demo))
    if d["status"] == "ok":
        step("evaluate", 40, lambda: evaluate(d["accuracy"]))
    step("real_run", 150, real_run)
    step("demo_compiled", 60 if bc.quick else 150, lambda: train_run("demo_compiled", compiled))
    if d["status"] == "ok" and os.path.isdir(os.path.join(pngs, "test")):
        step("predict", 30, predict)
    step("steps", 60, lambda: steps(eager))
    step("checkpoint", 20, lambda: {"status": "ok",
                                    **checkpoint_cost(step_run(eager, dev, 64))})
    if not bc.quick:
        step("steps_compiled", 150, lambda: steps(bc, [int(bc.sizes.split(",")[0])],
                                                  ["compiled"]))
    counts = {k: sum(v["status"] == k for v in status.values())
              for k in ("ok", "failed", "timeout", "skipped")}
    bad = [k for k, v in status.items() if v["status"] in ("failed", "timeout")]
    print("\ngpu check: " + ", ".join(f"{n} {k}" for k, n in counts.items()) +
          (f" ({', '.join(bad)}: see the log_tail in the JSON and {log})" if bad else ""))
    return status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, BenchConfig)
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    bc = BenchConfig(**vars(args))
    dev = devices.pick_device(bc.device)
    out = bc.out or ("gpu_check.json" if bc.gpu_check else "bench.json")
    env = {"device": devices.describe(dev), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
           "git_commit": train.git_commit(), "config": asdict(bc)}
    print(json.dumps(env))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    res = Results(out, env)
    if bc.gpu_check:
        log = os.path.splitext(out)[0] + ".log"  # every script's output, one after another
        open(log, "w").close()
        gpu_check(bc, dev, res, log)
    else:
        run_parts(bc, dev, res)
        print("\n" + report(res.r))
    return res.r


def report(r):
    """The results as the tables BENCHMARKS.md shows (whatever parts the file holds)."""
    lines = [f"{r['env']['device']}, torch {r['env']['torch']}, {r['env']['date']}"]
    for part in ("ceiling", "loop"):
        if r.get(part):
            lines += ["", f"{part}, batch {r[part][0]['batch']}:", "",
                      "| size | phase | mode | ceiling img/s |" +
                      (" real img/s | (b)/(a) |" if part == "loop" else "") + " peak GiB |",
                      "|---" * (7 if part == "loop" else 5) + "|"]
            for s in r[part]:
                real = f" {s['real']:,.0f} | {s['ratio']:.3f} |" if part == "loop" else ""
                peak = f"{s['peak_gib']:.1f}" if s.get("peak_gib") is not None else "-"
                lines.append(f"| {s['size']} | {s['phase']} | {s['mode']} | "
                             f"{s['ceiling']:,.0f} |{real} {peak} |")
    if r.get("checkpoint"):
        c = r["checkpoint"]
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
    if r.get("cache_rate"):
        c = r["cache_rate"]
        lines += ["", f"cache build: {c['images_s']:.0f} images/s on {r['env']['cpus']} cores "
                      f"({c['per_core']:.0f} per core), {c['png_px']} px 8-bit PNG"]
    return "\n".join(lines)


if __name__ == "__main__":
    r = main()  # exit status 1 when a step of --gpu-check failed or timed out
    sys.exit(any(v["status"] in ("failed", "timeout") for v in r.get("gpu_check", {}).values()))
