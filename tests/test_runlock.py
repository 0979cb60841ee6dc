"""One writer per run folder: two trainings on one folder, readers of a folder being written,
and a lock that dies with its process (SIGKILL included)."""
import json
import os
import signal
import subprocess
import sys

import pytest

import ablate
import compare
import evaluate
import export
import predict
import report
import train
from machinery import runlock
from machinery.config import parse_args
from machinery.datasets import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--data", "phantom", "--phantoms", "64", "--arch", "resnet18", "--weights", "none",
       "--device", "cpu", "--stages", "32", "--frozen-epochs", "0", "--unfrozen-epochs", "2",
       "--batch-size", "16", "--lr-unfrozen", "1e-3", "--cache-dir", ""]
BUSY = "is being written by another process"


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """Two train.py started together on one folder: (their results, the folder)."""
    runs = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--runs", str(runs),
           "--name", "same"]
    both = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    return [(p.wait(timeout=300), p.stdout.read()) for p in both], runs / "same"


def test_two_trainings_on_one_folder_one_trains_the_other_stops(raced):
    results, run = raced
    assert sorted(rc for rc, _ in results) == [0, 1], [out[-800:] for _, out in results]
    loser = next(out for rc, out in results if rc)
    assert f"{run} {BUSY} (train.py --data phantom" in loser and "choose another --name" in loser
    assert "Traceback" not in loser
    winner = next(out for rc, out in results if rc == 0)  # a log a file can hold:
    assert "\r" not in winner and "config: {" not in winner  # no bar frames, no config dump
    assert f"config: {run / 'config.json'} (every knob, not in this log; run it again: " \
        "--config that file)" in winner
    assert "s1_32_unfrozen epoch 2/2: train loss" in winner  # a line per epoch
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]  # every line parses
    assert [r["epoch"] for r in rows] == [1, 2]  # the winner's epochs, once each
    assert {"report.md", "MODEL_CARD.md", "test_metrics.json", "model.pt"} <= set(os.listdir(run))
    assert not (run / runlock.LOCK).exists() and not (run / "last.pt").exists()


def test_readers_refuse_a_folder_being_written_until_its_writer_dies(raced, tmp_path, capsys):
    _, run = raced
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from machinery import "
                               "runlock; runlock.hold(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(300)", str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert runlock.writer(str(run))["pid"] == holder.pid
        for read in (lambda: export.export(str(run), str(tmp_path / "x")),
                     lambda: predict.Classifier.load(str(run / "model.pt")),
                     lambda: evaluate.main([str(run), "--data", "phantom", "--cache-dir", ""]),
                     lambda: report.main([str(run)])):
            with pytest.raises(DataError, match=f"{BUSY} .*pid {holder.pid} .*its files are "
                               "not whole yet"):
                read()
        with pytest.raises(SystemExit, match="no finished run among"):
            compare.main([str(run), "--out", str(tmp_path / "c")])
        assert f"skipped {run} {BUSY}" in capsys.readouterr().out
        with pytest.raises(SystemExit, match=f"{BUSY} \\(-c {run}, pid {holder.pid} on "):
            train.main(parse_args(["--resume", str(run)]))  # before it reads last.pt
        with pytest.raises(SystemExit, match=f"{BUSY} .*or choose another --out"):
            ablate.main([*RUN, "--variants", "paper", "--seeds", "0", "--out", str(run)])
    finally:
        holder.send_signal(signal.SIGKILL)  # no exit handler runs: the lock file stays
        holder.wait()
    assert (run / runlock.LOCK).exists() and runlock.writer(str(run)) is None
    assert predict.Classifier.load(str(run)).size == 32  # the lock went with its process


def test_a_process_never_waits_for_itself(tmp_path):
    runlock.hold(str(tmp_path))
    try:
        assert runlock.writer(str(tmp_path)) is None and (tmp_path / runlock.LOCK).exists()
        runlock.hold(str(tmp_path))  # again: it is this process's already
    finally:
        runlock.release(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the lock file goes with the lock
    runlock.hold(str(tmp_path))
    (tmp_path / "other").write_text("{}")  # another's lock file in its place (the folder
    os.replace(tmp_path / "other", tmp_path / runlock.LOCK)  # moved, and made again)
    runlock.release(str(tmp_path))
    assert (tmp_path / runlock.LOCK).read_text() == "{}"  # not this process's to remove
