"""bench.py in its quick mode (no timing assertions: timings belong in BENCHMARKS.md), and the
first-GPU check run on the CPU with every CUDA-side knob on (bf16, channels_last, compile)."""
import json
import os
import tempfile

import pytest

import bench
from machinery import devices
from benchmarks import gpucheck
from benchmarks import measure


def test_bench_quick_measures_every_part(tmp_path, capsys):
    r = bench.main(["--quick", "--out", str(tmp_path / "b.json")])
    assert json.load(open(tmp_path / "b.json"))["env"]["config"]["quick"] is True
    for part in ("ceiling", "loop"):
        assert [(s["size"], s["phase"], s["mode"]) for s in r[part]] == \
            [(32, "frozen", "eager"), (32, "unfrozen", "eager"), (40, "frozen", "eager"),
             (40, "unfrozen", "eager")]
    for s in r["loop"]:
        assert s["ceiling"] > 0 and s["real"] > 0 and s["ratio"] == s["real"] / s["ceiling"]
    c = r["checkpoint"]
    assert c["mib"] > 40 and c["write_s"] > 0 and c["before_s"] > 0  # ResNet-18 + Adam
    e = r["e2e"]["32:16"]
    for state in ("cold", "warm"):
        assert {"setup", "lr_find", "train", "eval", "checkpoint", "total"} <= set(e[state])
    assert r["cache_rate"]["images"] == 16 and r["cache_rate"]["images_s"] > 0
    out = capsys.readouterr().out
    assert "| 40 | unfrozen | eager |" in out and "cache build:" in out


def test_parts_run_one_per_call_and_merge_into_one_file(tmp_path):
    out = str(tmp_path / "b.json")
    bench.main(["--quick", "--part", "ceiling", "--sizes", "32", "--out", out])
    bench.main(["--quick", "--part", "ceiling", "--sizes", "40", "--out", out])
    r = bench.main(["--quick", "--part", "cache", "--out", out])
    assert [(s["size"], s["phase"]) for s in r["ceiling"]] == \
        [(32, "frozen"), (32, "unfrozen"), (40, "frozen"), (40, "unfrozen")]
    assert r["cache_rate"]["images"] == 16 and "loop" not in r
    again = bench.main(["--quick", "--part", "ceiling", "--sizes", "40", "--out", out])
    assert len(again["ceiling"]) == 4  # a row measured again replaces the old one


def test_ddp_scaling_runs_train_py_under_torchrun_against_one_process(tmp_path, capsys):
    r = bench.main(["--quick", "--ddp", "2", "--out", str(tmp_path / "d.json")])["ddp"]
    assert len(r) == 1 and r[0]["ranks"] == 2 and r[0]["img_s_1"] > 0
    assert r[0]["efficiency"] == r[0]["img_s_2"] / 2 / r[0]["img_s_1"]
    # as a user runs them: validation and last.pt every epoch (defaults); the 2 ranks' epoch
    e = r[0]["as_run"]
    assert e["epoch_s"] == e["train_s"] + e["val_s"] + e["checkpoint_s"]
    assert e["train_s"] > 0 and e["val_s"] > 0 and e["checkpoint_s"] > 0
    assert e["img_s"] == e["films"] / e["epoch_s"] < e["img_s_steps"]
    assert e["films"] % 16 == 0 and e["timings_s"]["checkpoint_writes"] > 0
    log = open(tmp_path / "d.log").read()
    assert "torch.distributed.run --standalone --nproc_per_node=2" in log
    assert "2 ranks (gloo)" in log  # the 2-rank run was data-parallel
    assert "--val-frac" not in log and "--save-every" not in log
    out = capsys.readouterr().out
    assert "| 2 | 32 | 8 |" in out and "| ranks | size | epoch s | steps s |" in out


def test_epoch_split_says_where_an_epochs_time_went(tmp_path):
    """From what train.py writes: 2 ranks x batch 4, 3 epochs (the first not counted) of 5
    steps (40 films), each 2 s of steps (20 img/s) and 0.5 s of validation; 0.3 s of
    checkpoint in all."""
    rows = [{"epoch": i, "time": 2.5, "img_s": 20.0} for i in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "steps.csv").write_text("epoch,step,loss\n" + "".join(
        f"{e},{k},0.5\n" for e in (1, 2, 3) for k in range(1, 6)))
    (tmp_path / "test_metrics.json").write_text(json.dumps({"timings_s": {"checkpoint": 0.3}}))
    e = measure.epoch_split(str(tmp_path), batch=4, ranks=2)
    assert e["films"] == 40 and e["train_s"] == 2.0 and e["val_s"] == 0.5
    assert e["checkpoint_s"] == pytest.approx(0.1) and e["epoch_s"] == pytest.approx(2.6)
    assert e["img_s"] == pytest.approx(40 / 2.6) and e["img_s_steps"] == 20.0


def test_gpu_check_runs_whole_on_the_cpu_with_bf16_channels_last_and_compile(tmp_path,
                                                                           monkeypatch):
    """The first-GPU check, its kernels aside: train (eager, then compiled), evaluate
    (reproducing train's accuracy, then TTA), predict with Grad-CAM, a real run killed and
    resumed, ratios, checkpoint cost; every knob the GPU takes on, on the CPU."""
    out, tmp = tmp_path / "check.json", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where its scratch folders go
    status = bench.main(["--gpu-check", "--quick", "--precision", "bf16", "--channels-last",
                         "on", "--compile-backend", "aot_eager", "--out", str(out)])["gpu_check"]
    assert list(status) == ["demo", "steps", "real_run", "evaluate", "predict", "demo_host",
                            "demo_compiled"]  # in order of value; --quick: no checkpoint
    assert status["demo_host"]["same_as_demo"]  # on the CPU, bit for bit
    assert all(s["status"] == "ok" for s in status.values()), \
        {k: s for k, s in status.items() if s["status"] != "ok"}
    assert json.load(open(out))["gpu_check"]["steps"]["status"] == "ok"  # as it went
    assert status["evaluate"]["same_as_train"]  # evaluate.py sees what train.py saw
    real = status["real_run"]
    assert real["killed_mid_run"] and real["resumed"] and real["each_epoch_once"]
    assert real["epochs"] == 4 and 1 <= real["epochs_in_last_pt"] < 4
    assert status["predict"]["cams"] == 16
    log = open(tmp_path / "check.log").read()  # every script's output, under a heading
    for name in ("demo", "demo_compiled"):
        section = log.split(f"===== {name}: python train.py")[1].split("=====")[0]
        assert "bf16 autocast, channels_last, fused AdamW" in section
    assert "compiled: yes" in log.split("===== demo_compiled:")[1]
    # compiled, the body stayed put while frozen and all of it trained once unfrozen
    assert status["demo_compiled"]["body"] == {"convs": 20, "moved_frozen": 0,
                                               "moved_unfrozen": 20}
    assert status["demo"]["arithmetic"] == "bf16 autocast"  # what ran, from config.json
    assert [r["body_moved"] for r in json.load(open(out))["loop"]] == [0, 1, 0, 1]
    assert "===== real run, killed" in log and "===== real run, resumed" in log
    assert "===== steps, eager: python bench.py --part loop" in log  # a process of its own
    assert len(json.load(open(out))["loop"]) == 4  # its rows, in the check's JSON
    # its runs and PNGs are removed (~700 MB a call, which once filled the disk)
    assert [f for f in os.listdir(tmp) if not f.startswith(("pymp-", "torchinductor"))] == []


def test_gpu_check_skips_what_the_budget_cannot_hold_and_goes_on_after_a_failure(
        tmp_path, monkeypatch):
    status = bench.main(["--gpu-check", "--quick", "--budget", "0", "--out",
                         str(tmp_path / "a.json")])["gpu_check"]
    assert {s["status"] for s in status.values()} == {"skipped"} and "demo" in status
    seen = []

    def script(name, args, log, timeout, *a, **k):
        seen.append(json.load(open(tmp_path / "b.json"))["gpu_check"])  # as it starts
        if name == "bench.py":  # a measurement: its JSON, as bench.py --part writes it
            tunings.append(args[args.index("--cudnn-benchmark") + 1])
            row = {"size": 32, "phase": "frozen", "mode": "eager", "ratio": 0.9, "real": 9,
                   "ceiling": 10, "peak_gib": None, "wall_s": 1.0, "body_moved": 0.0}
            json.dump({"loop": [row], "checkpoint": {"mib": 42.0}},
                      open(args[args.index("--out") + 1], "w"))
        return (1, 0.1, f"{name}: boom") if name == "train.py" else (0, 0.1, "")
    tunings = []
    monkeypatch.setattr(gpucheck, "script", script)

    def dies(*a, **k):
        raise RuntimeError("the GPU fell off")
    monkeypatch.setattr(gpucheck, "killed_and_resumed", dies)
    bc = measure.BenchConfig(**{**measure.QUICK, "gpu_check": True, "out": str(tmp_path / "b.json"),
                                "only": "evaluate,real_run,steps,checkpoint,autotune"})
    res = measure.Results(bc.out, {"config": {}})
    status = gpucheck.gpu_check(bc, devices.pick_device("cpu"), res, str(tmp_path / "b.log"))
    assert list(status) == ["demo", "steps", "checkpoint", "real_run", "autotune"]  # +demo
    assert tunings == ["on", "on", "off", "1"]  # autotune: the steps with cuDNN's off, then 1
    assert status["steps"]["min_ratio"] == 0.9 and status["checkpoint"]["mib"] == 42.0
    assert status["autotune"]["1"]["rows"][0]["real"] == 9
    assert seen[0] == {"demo": {"status": "running", "started_at_s": seen[0]["demo"][
        "started_at_s"]}}  # written before it ran: a call killed from outside says where
    assert status["demo"]["status"] == "failed" and "boom" in status["demo"]["log_tail"]
    assert status["real_run"] == {"status": "failed", "why": "RuntimeError: the GPU fell off",
                                  "step_s": status["real_run"]["step_s"]}
    assert status["steps"]["status"] == "ok"  # it went on after the failures


def test_gpu_check_refuses_to_run_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no CUDA device in this process.*refuses"):
        bench.main(["--gpu-check", "--device", "cpu", "--out", str(tmp_path / "c.json")])
    assert '"cuda_available"' in capsys.readouterr().out  # what it saw, for the log


def test_compile_rule_from_the_measured_numbers():
    # COVIDx v1 (5,310 training films): no stage of the 41 epochs repays 3 compilations
    assert not devices.compile_pays(8 * 5310, 128)
    assert not devices.compile_pays(25 * 5310, 229)
    assert not devices.compile_pays(25 * 30000, 229)  # nor on COVIDx9A's size
    assert devices.compile_pays(10_000_000, 128)  # tens of millions of images would
