"""bench.py in its quick mode (no timing assertions: timings belong in BENCHMARKS.md)."""
import json

import bench
import train


def test_bench_quick_measures_every_part(tmp_path, capsys):
    r = bench.main(["--quick", "--out", str(tmp_path / "b.json")])
    assert json.load(open(tmp_path / "b.json"))["env"]["config"]["quick"] is True
    assert [(s["size"], s["phase"]) for s in r["steps"]] == \
        [(32, "frozen"), (32, "unfrozen"), (40, "frozen"), (40, "unfrozen")]
    for s in r["steps"]:
        assert s["ceiling_eager"] > 0 and s["real_eager"] > 0
        assert s["ratio"] == s["real_eager"] / s["ceiling_eager"]
    e = r["e2e"]["32:16"]
    for state in ("cold", "warm"):
        assert {"setup", "lr_find", "train", "eval", "total"} <= set(e[state])
    assert r["cache_rate"]["images"] == 16 and r["cache_rate"]["images_s"] > 0
    out = capsys.readouterr().out
    assert "| 40 | unfrozen |" in out and "cache build:" in out


def test_compile_rule_from_the_measured_numbers():
    # COVIDx v1 (5,310 training films): no stage of the 41 epochs repays 3 compilations
    assert not train.compile_pays(8 * 5310, 128)
    assert not train.compile_pays(25 * 5310, 229)
    assert not train.compile_pays(25 * 30000, 229)  # nor on COVIDx9A's size
    assert train.compile_pays(10_000_000, 128)  # tens of millions of images would
