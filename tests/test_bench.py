"""bench.py in its quick mode (no timing assertions: timings belong in BENCHMARKS.md), and the
first-GPU check run on the CPU with every CUDA-side knob on (bf16, channels_last, compile)."""
import json
import os

import bench
import train


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


def test_gpu_check_runs_whole_on_the_cpu_with_bf16_channels_last_and_compile(tmp_path):
    """The first-GPU check, its kernels aside: train (eager, then compiled), evaluate
    (reproducing train's accuracy, then TTA), predict with Grad-CAM, a real run killed and
    resumed, ratios, checkpoint cost; every knob the GPU takes on, on the CPU."""
    out = tmp_path / "check.json"
    status = bench.main(["--gpu-check", "--quick", "--precision", "bf16", "--channels-last",
                         "on", "--compile-backend", "aot_eager", "--out", str(out)])["gpu_check"]
    assert list(status) == ["demo", "evaluate", "real_run", "predict", "steps", "checkpoint",
                            "demo_compiled"]
    assert all(s["ok"] for s in status.values()), {k: s for k, s in status.items()
                                                   if not s["ok"]}
    assert json.load(open(out))["gpu_check"]["demo_compiled"]["ok"]  # written as it went
    assert status["evaluate"]["same_as_train"]  # evaluate.py sees what train.py saw
    real = status["real_run"]
    assert real["killed_mid_run"] and real["resumed"] and real["each_epoch_once"]
    assert real["epochs"] == 6 and 1 <= real["epochs_in_last_pt"] < 6
    assert status["predict"]["cams"] == 16
    logs = tmp_path / "check_logs"
    for name in ("demo", "demo_compiled"):
        log = open(logs / f"{name}.log").read()
        assert "bf16 autocast, channels_last, fused AdamW" in log
    assert "compiled: yes" in open(logs / "demo_compiled.log").read()
    assert os.path.isfile(logs / "real_run.log.killed")


def test_compile_rule_from_the_measured_numbers():
    # COVIDx v1 (5,310 training films): no stage of the 41 epochs repays 3 compilations
    assert not train.compile_pays(8 * 5310, 128)
    assert not train.compile_pays(25 * 5310, 229)
    assert not train.compile_pays(25 * 30000, 229)  # nor on COVIDx9A's size
    assert train.compile_pays(10_000_000, 128)  # tens of millions of images would
