"""The first run on a new GPU: `python bench.py --gpu-check` (see gpu_check()).

The project's scripts run as a user runs them, on the device, each step within a budget, its
result written to JSON as soon as it ends, every script's output to one log.
"""
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.measure import ROOT, metrics_rows, scratch, write_phantom_covidx
from machinery import phantom
from machinery.config import DEMO
from model import build_model


def start(name, args, log, title, env=None):
    """Start one of the project's scripts as a user would, its output appended to `log`
    under a heading; (process, offset where its output begins)."""
    with open(log, "a") as f:
        f.write(f"\n===== {title}: python {name} {' '.join(map(str, args))}\n")
        offset = f.tell()
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, name), *map(str, args)],
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env=None if env is None else {**os.environ, **env})
    return p, offset


def script(name, args, log, timeout, title=None, env=None):
    """Run a script to its end, or kill it at `timeout` seconds.
    (exit code or 'timeout', seconds, what it printed)."""
    t0 = time.time()
    p, offset = start(name, args, log, title or name, env)
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = "timeout"
    with open(log, errors="replace") as f:
        f.seek(offset)
        return rc, time.time() - t0, f.read()


def ran(code, text, **more):
    """A script's result: ok, timeout or failed, `more`, the end of its output when not ok."""
    ok = "ok" if code == 0 else "timeout" if code == "timeout" else "failed"
    return {"status": ok, **more, **({} if code == 0 else {"log_tail": text[-3000:]})}


def peaks(rows):
    """The highest peak_gib and peak_reserved_gib of metrics or step rows (0: not measured)."""
    return {k: max((r.get(k) or 0 for r in rows), default=0)
            for k in ("peak_gib", "peak_reserved_gib")}


def killed_and_resumed(args, runs, log, timeout):
    """train.py killed (SIGKILL) once two epochs are logged and last.pt exists, then
    --resume'd: it must go on from the last saved epoch and train each epoch once."""
    t0 = time.time()
    run_dir = os.path.join(runs, "real")
    metrics, last = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "last.pt")
    p, _ = start("train.py", [*args, "--runs", runs, "--name", "real"], log, "real run, killed")
    while p.poll() is None and time.time() - t0 < timeout:
        if os.path.isfile(metrics) and len(open(metrics).readlines()) >= 2 and os.path.isfile(last):
            break
        time.sleep(0.02)
    was_running = p.poll() is None
    if was_running:
        p.kill()  # SIGKILL
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
        return {**out, **ran(rc, text, why="the resumed run did not end well")}
    m = json.load(open(os.path.join(run_dir, "test_metrics.json")))
    rows = metrics_rows(run_dir)
    phases = [(r["phase"], r["epoch"]) for r in rows]
    out.update(accuracy=m["accuracy"]["value"], timings=m["timings_s"],
               epochs=len(rows), each_epoch_once=len(set(phases)) == len(phases),
               resumed="resuming" in text,
               per_phase=[{k: r.get(k) for k in ("phase", "img_s", "time", "peak_gib",
                                                 "peak_reserved_gib")} for r in rows])
    good = out["resumed"] and out["each_epoch_once"] and was_running
    return {"status": "ok" if good else "failed", **out}


# The steps in order of value: what is cheap and tells most first, compilation last. Each
# with the seconds of budget it needs to start: a little over the top of what it is expected
# to take on one H100 (estimated by reading, no GPU has run them yet: demo 18-28 s, steps
# 28-38, checkpoint 10-15, real_run 40-55, evaluate 16-22, predict 8-12, demo_host 18-28,
# autotune 45-60, demo_compiled 60-120, steps_compiled 100-160: 343-538 s in all). Each
# script starts Python, torch and CUDA, then autotunes; the compiled steps compile.
STEPS = {"demo": 45, "steps": 45, "checkpoint": 20, "real_run": 90, "evaluate": 30,
         "predict": 15, "demo_host": 30, "autotune": 90, "demo_compiled": 120,
         "steps_compiled": 150}
NEEDS_DEMO = ("evaluate", "predict", "demo_host")  # they read the demo's run or result


def body_moved(a, b):
    """(how many of the body's convolution weights differ between state dicts a and b, how
    many there are): a frozen phase must move none of them, an unfrozen one all."""
    convs = [k for k in a if k.startswith("body.") and k.endswith(".weight") and a[k].dim() == 4]
    return sum(not torch.equal(a[k], b[k]) for k in convs), len(convs)


def require_cuda(bc):
    """Stop at once, saying what this process sees of CUDA, when the check would run on the
    CPU: it would spend the GPU's lease there (--quick is the CPU check, seconds)."""
    if bc.quick:
        return
    seen = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "python": sys.executable}
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        seen["nvidia_smi"] = (smi.stdout + smi.stderr).strip()[-1000:]
    except (OSError, subprocess.TimeoutExpired) as e:
        seen["nvidia_smi"] = f"{type(e).__name__}: {e}"
    if not seen["cuda_available"] or bc.device == "cpu":
        print(json.dumps(seen))
        raise SystemExit(f"--gpu-check: no CUDA device in this process (--device {bc.device}; "
                         f"torch {seen['torch']}, built for CUDA {seen['torch_cuda']}; "
                         f"{seen['device_count']} device(s); CUDA_VISIBLE_DEVICES="
                         f"{seen['CUDA_VISIBLE_DEVICES']}; nvidia-smi: "
                         f"{seen['nvidia_smi'][:300]}). It checks the CUDA path and refuses "
                         "to spend its budget on the CPU (--quick: the CPU, in seconds)")


def gpu_check(bc, dev, res, log):
    """The first run on a new GPU, in one call, within bc.budget seconds, in order of value;
    every step a script run as a user runs it, killed at the budget's end:

    demo          the demo on the device, eager, as a user runs it (train.py --demo);
    steps         ceiling vs real loop per stage and phase, eager, with peak memory
                  (bench.py --part loop);
    checkpoint    the cost of one epoch's snapshot and last.pt write for ResNet-50 with Adam
                  (bench.py --part checkpoint);
    real_run      ResNet-50 at 128/224/229 px on a few hundred phantom PNGs (decoding, cache),
                  one epoch per phase, killed with SIGKILL after two epochs and --resume'd;
    evaluate      evaluate.py on the demo's run: plain (it must reproduce train.py's test
                  accuracy), then fastai v1's TTA (not with --quick);
    predict       predict.py with Grad-CAM on phantom test PNGs;
    demo_host     the demo with --data-on cpu: films in host memory, each batch gathered into
                  pinned memory and copied without waiting (the path for data larger than
                  the GPU);
    autotune      the steps again with cuDNN's autotuning off, then limited to one
                  algorithm a shape: what tuning costs (wall_s) against what it gains (img/s);
    demo_compiled the demo's model with --compile on, frozen then unfrozen at one size (two
                  stages of 64 px, 1 + 0 and 0 + 2 epochs: the frozen, unfrozen and
                  evaluation graphs, every kind training compiles); the body's convolutions
                  must stay put in the first stage and all move in the second;
    steps_compiled  ceiling vs real loop compiled, at the first size, frozen then unfrozen;
                  the body trained in the unfrozen row alone, as in `steps`.
    bc.only: the steps to run (a second call for what a first one skipped), the demo added
    when a step needs it. A step is skipped when less of the budget is left than it needs.
    Each step is written to the JSON as "running" before it starts and with its result when it
    ends, and one that fails does not stop the rest. Returns {step: result};
    result["status"] is one of ok, failed, timeout, skipped.
    """
    c = Check(bc, dev, res, log)
    d = c.step("demo", c.train_run, "demo", c.demo_args) or {"status": "not run"}
    c.step("steps", c.steps, "eager", bc.sizes)
    c.step("checkpoint", c.checkpoint)
    c.step("real_run", c.real_run)
    if d["status"] == "ok":  # these read the demo's run folder or its result
        c.step("evaluate", c.evaluate, d["accuracy"])
        c.step("predict", c.predict)
        c.step("demo_host", c.demo_host, d)
    c.step("autotune", c.autotune)
    c.step("demo_compiled", c.demo_compiled)
    c.step("steps_compiled", c.steps, "compiled", bc.sizes.split(",")[0])
    counts = {k: sum(v["status"] == k for v in c.status.values())
              for k in ("ok", "failed", "timeout", "skipped")}
    bad = [k for k, v in c.status.items() if v["status"] in ("failed", "timeout")]
    print("\ngpu check: " + ", ".join(f"{n} {k}" for k, n in counts.items()) +
          (f" ({', '.join(bad)}: see the log_tail in the JSON and {log})" if bad else ""))
    return c.status


class Check:
    """gpu_check's steps, each a method returning its result, run by step() within the
    budget; the flags and scratch folders they share. --quick: seconds on a CPU, every step
    that needs no GPU, nothing measured."""

    def __init__(self, bc, dev, res, log):
        self.bc, self.res, self.log, self.status = bc, res, log, {}
        self.t_end = time.time() + bc.budget
        only = [s for s in bc.only.split(",") if s] or list(STEPS)
        unknown = [s for s in only if s not in STEPS]
        if unknown:
            raise SystemExit(f"--only {','.join(unknown)}: the steps are {', '.join(STEPS)}")
        if any(s in NEEDS_DEMO for s in only):
            only.append("demo")
        if bc.quick:  # minutes of compiling on a CPU; no cuDNN; checkpoint: `steps`' way again
            only = [s for s in only if s not in ("steps_compiled", "autotune", "checkpoint")]
        self.only = only
        self.runs = scratch()
        self.pngs = os.path.join(self.runs, "pngs")
        self.flags = ["--device", str(dev), "--precision", bc.precision, "--channels-last",
                      bc.channels_last]  # evaluate.py and predict.py take these three
        train_flags = [*self.flags, "--compile-backend", bc.compile_backend]
        self.demo_args = ["--demo", *train_flags]
        self.size = 32 if bc.quick else 64  # frozen, then unfrozen, at one size: a stage each
        self.compiled = [*self.demo_args, "--stages", f"{self.size},{self.size}",
                         "--frozen-epochs", "1,0", "--unfrozen-epochs", "0,2", "--compile", "on"]
        frozen, unfrozen, lr_steps = ("1,0", "1,2", "6") if bc.quick else ("1,1,0", "1,1,1", "20")
        self.real = ["--data", self.pngs, "--cache-dir", os.path.join(self.runs, "cache"),
                     "--arch", bc.arch, "--weights", "none", "--stages", bc.sizes,
                     "--frozen-epochs", frozen, "--unfrozen-epochs", unfrozen, "--batch-size",
                     str(bc.batch_size), "--lr-find-steps", lr_steps, "--save-every", "0",
                     *train_flags]
        self.n_real, self.png, self.n_eval = (96, 64, 96) if bc.quick else (384, 512, 640)
        if bc.quick:
            tiny = ["--phantoms", "96", "--lr-find-steps", "6", "--batch-size", "16"]
            self.compiled += tiny  # its own stages, at 32 px
            self.demo_args += tiny + ["--stages", "32", "--frozen-epochs", "0",
                                      "--unfrozen-epochs", "2"]

    def left(self):
        return self.t_end - time.time()

    def step(self, name, fn, *args):
        """fn(*args) -> result dict as step `name`, within the budget; recorded and printed.
        None when the step is not asked for."""
        if name not in self.only:
            return None
        if self.left() < STEPS[name]:
            out = {"status": "skipped", "why": f"{self.left():.0f} s of the budget left, it "
                                                f"needs about {STEPS[name]:.0f} s"}
        else:
            self.status[name] = {"status": "running",
                                 "started_at_s": self.bc.budget - self.left()}
            self.res.set("gpu_check", self.status)  # a call killed from outside: where it was
            t0 = time.time()
            try:
                out = fn(*args)
            except Exception as e:  # said, and the check goes on
                out = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
            out.setdefault("step_s", time.time() - t0)
        self.status[name] = out
        self.res.set("gpu_check", self.status)
        print(f"[{out['status']}] {name}: " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()
            if k not in ("status", "log_tail", "timings", "per_phase", "off", "1")), flush=True)
        return out

    def script(self, name, args, title=None, env=None, secs="wall_s"):
        """Run a script until it ends or the budget does: ran()'s result, its seconds as `secs`."""
        rc, seconds, text = script(name, args, self.log, self.left(), title, env)
        return ran(rc, text, rc=rc, **{secs: seconds})

    def train_run(self, name, args):
        out = self.script("train.py", [*args, "--runs", self.runs, "--name", name], name)
        if out["rc"] == 0:
            folder = os.path.join(self.runs, name)
            m = json.load(open(os.path.join(folder, "test_metrics.json")))
            out.update(accuracy=m["accuracy"]["value"], timings=m["timings_s"],
                       arithmetic=json.load(open(os.path.join(folder, "config.json"))).get(
                           "arithmetic"),  # what ran: bf16 autocast, fp32 (TF32 off), ...
                       **peaks(metrics_rows(folder)))
        return out

    def demo_host(self, ref):
        """The demo with its films in host memory: the very accuracy of the demo's."""
        out = self.train_run("demo_host", [*self.demo_args, "--data-on", "cpu"])
        if out["status"] == "ok":
            out["same_as_demo"] = out["accuracy"] == ref["accuracy"]
        return out

    def demo_compiled(self):
        """The compiled demo from saved initial weights; the body must not move while frozen
        (stage 1) and must all move once unfrozen (stage 2): torch 2.11 once reused the frozen
        graph after unfreezing, and the body never trained."""
        init = os.path.join(self.runs, "init.pt")
        torch.manual_seed(0)
        torch.save(build_model(len(phantom.CLASSES), "none", DEMO["arch"]).state_dict(), init)
        out = self.train_run("demo_compiled", [*self.compiled, "--weights", init])
        if out["status"] == "ok":
            folder = os.path.join(self.runs, "demo_compiled")
            weights = [torch.load(init, weights_only=True)] + [torch.load(
                os.path.join(folder, f), map_location="cpu", weights_only=True)["model"]
                for f in (f"stage1_{self.size}.pt", "model.pt")]
            (frozen, n), (unfrozen, _) = [body_moved(a, b) for a, b in zip(weights, weights[1:])]
            out["body"] = {"convs": n, "moved_frozen": frozen, "moved_unfrozen": unfrozen}
            if frozen or unfrozen < n:
                out.update(status="failed", why=f"compiled, the body's convolutions moved: "
                           f"{frozen} of {n} while frozen (0 expected), {unfrozen} of {n} "
                           "once unfrozen (all expected)")
        return out

    def measured(self, part, mode, sizes, title, tuning="on"):
        """bench.py --part `part` in its own process (killed at the budget's end, what it
        measured by then kept): (result, its JSON's `part`: [] when it measured none)."""
        bc, sub = self.bc, os.path.join(self.runs, f"{part}_{mode}_{tuning}.json")
        out = self.script("bench.py", [
            "--part", part, "--modes", mode, "--sizes", sizes, "--out", sub, "--arch", bc.arch,
            "--batch-size", bc.batch_size, "--steps", bc.steps, "--warmup", bc.warmup,
            "--compile-backend", bc.compile_backend, "--cudnn-benchmark", tuning, *self.flags],
            title, env={"TMPDIR": self.runs})  # its scratch in ours: removed anyway
        got = json.load(open(sub)) if os.path.isfile(sub) else {}
        return out, got.get(part) or []

    def steps(self, mode, sizes):
        out, rows = self.measured("loop", mode, sizes, f"steps, {mode}")
        for row in rows:
            self.res.add_row("loop", row)
        if rows:
            out.update(rows=len(rows), min_ratio=min(r["ratio"] for r in rows), **peaks(rows))
            # the body's share of convolutions that moved: none frozen, all unfrozen
            wrong = [f"{r['size']} px {r['phase']}: {r['body_moved']:.2f}" for r in rows
                     if r["body_moved"] != (r["phase"] == "unfrozen")]
            if wrong:
                out.update(status="failed", why=f"{mode}, the body's convolutions that moved "
                           f"(0 frozen, 1 unfrozen expected): {', '.join(wrong)}")
        return out

    def autotune(self):
        """The eager steps with other --cudnn-benchmark settings, beside `steps` (on)."""
        out = {"status": "ok"}
        for tuning in ("off", "1"):
            got_out, rows = self.measured("loop", "eager", self.bc.sizes,
                                          f"steps, cudnn {tuning}", tuning)
            out[tuning] = {"status": got_out["status"], "wall_s": sum(r["wall_s"] for r in rows),
                           "rows": [{k: r[k] for k in ("size", "phase", "ceiling", "real",
                                                       "wall_s")} for r in rows]}
            if got_out["status"] != "ok":
                out.update(status=got_out["status"], log_tail=got_out.get("log_tail"))
                break
        return out

    def checkpoint(self):
        out, got = self.measured("checkpoint", "eager", self.bc.sizes, "checkpoint")
        if got:
            self.res.set("checkpoint", got)
            out.update(got)
        return out

    def write_pngs(self):
        if not os.path.isdir(os.path.join(self.pngs, "test")):
            write_phantom_covidx(self.pngs, self.n_real, self.n_real // 6, self.png)

    def real_run(self):
        t0 = time.time()
        self.write_pngs()
        write_s = time.time() - t0
        return {**killed_and_resumed(self.real, self.runs, self.log, self.left()),
                "write_pngs_s": write_s}

    def evaluate(self, train_acc):
        runs = self.runs
        ev = [os.path.join(runs, "demo"), "--data", "phantom", "--phantoms", self.n_eval,
              *self.flags]
        out = self.script("evaluate.py", [*ev, "--out", os.path.join(runs, "eval")])
        if out["rc"] == 0:
            acc = json.load(open(os.path.join(runs, "eval", "metrics.json")))["accuracy"]
            out.update(accuracy=acc["value"], same_as_train=acc["value"] == train_acc)
        if out["rc"] == 0 and not self.bc.quick:  # TTA: test_evaluate.py checks its views, CPU
            out.update(self.script("evaluate.py", [*ev, "--tta", "v1", "--out", os.path.join(
                runs, "tta")], "evaluate.py --tta v1", secs="tta_s"))
            if out["rc"] == 0:
                out["tta_accuracy"] = json.load(open(os.path.join(
                    runs, "tta", "metrics.json")))["accuracy"]["value"]
        return out

    def predict(self):
        self.write_pngs()
        runs = self.runs
        out = self.script("predict.py", [
            os.path.join(runs, "demo"), os.path.join(self.pngs, "test"), "--out",
            os.path.join(runs, "pred.csv"), "--cam", os.path.join(runs, "cams"), *self.flags])
        if out["rc"] == 0:
            out["cams"] = len(os.listdir(os.path.join(runs, "cams")))
        return out
