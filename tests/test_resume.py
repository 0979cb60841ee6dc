"""Crash safety: a run killed with SIGKILL mid-epoch resumes to the very same final weights."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--data", "phantom", "--phantoms", "96", "--arch", "resnet18", "--weights", "none",
       "--device", "cpu", "--stages", "32,40", "--frozen-epochs", "1,0",
       "--unfrozen-epochs", "2,2", "--batch-size", "16", "--lr-find-steps", "4",
       "--lr-find-start", "1e-5", "--lr-find-end", "1", "--cache-dir", ""]


def train(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *RUN, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path):
    runs = str(tmp_path)
    whole = train("--runs", runs, "--name", "whole")
    assert whole.wait(timeout=300) == 0

    killed = train("--runs", runs, "--name", "killed")
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for two finished epochs, then kill during the third
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model.pt").exists()  # it really died before the end
    done = len(torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["history"])
    assert done >= 1  # epochs complete when it died
    unfinished_is_refused_unless_asked(tmp_path / "killed", done)

    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume",
                              str(tmp_path / "killed")], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    trained = re.findall(r"^s\d+_\d+_\w+ epoch \d+/\d+:", resumed.stdout, re.M)
    assert len(trained) == 5 - done  # it went on from the last complete epoch: no epoch twice
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit, BatchNorm statistics included
    rows = [json.loads(line) for line in open(tmp_path / "killed" / "metrics.jsonl")]
    whole_rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert [(r["phase"], r["epoch"], r["train_loss"]) for r in rows] == \
        [(r["phase"], r["epoch"], r["train_loss"]) for r in whole_rows]
    steps = [(tmp_path / k / "steps.csv").read_text() for k in ("whole", "killed")]
    assert steps[0] == steps[1]  # every step's loss, once, the killed epoch's from its rerun
    ma = json.load(open(tmp_path / "whole" / "test_metrics.json"))
    mb = json.load(open(tmp_path / "killed" / "test_metrics.json"))
    assert ma["confusion_matrix"] == mb["confusion_matrix"]


def unfinished_is_refused_unless_asked(run, done):
    """A killed run (its lock gone with its process): export.py, evaluate.py and the API refuse
    its folder and its last.pt, saying how to finish it; --allow-unfinished exports it with the
    size it trained at and a card that says what it is."""
    import export
    import predict
    from machinery.checkpoint import CheckpointError
    out = run.parent / "export"  # not in the run folder, which --resume goes on with
    for path in (run, run / "last.pt"):
        with pytest.raises(CheckpointError, match=r"unfinished run.*python train\.py --resume "
                           rf"{run}, or take these weights anyway with --allow-unfinished"):
            export.export(str(path), str(out))
        with pytest.raises(CheckpointError, match="allow_unfinished=True"):
            predict.Classifier.load(str(path))
    assert not out.exists()
    export.main([str(run), "--allow-unfinished", "--out", str(out)])
    size = torch.load(run / "last.pt", weights_only=True)["size"]
    assert size in (32, 40) and json.load(open(out / "classes.json"))["size"] == size
    card = (out / "MODEL_CARD.md").read_text()
    assert re.search(rf"\*\*Not the finished model: the weights of an unfinished run, stopped "
                     rf"after epoch \d of \d of stage \d's \S+ phase \({done} epoch\(s\) "
                     rf"trained in all, at {size} px\)\.\*\*", card), card[:600]
    assert f"resized to {size} x {size} px" in card
    clf = predict.Classifier.load(str(run), allow_unfinished=True)
    assert clf.size == size and clf.weights.startswith("the weights of an unfinished run")


def test_a_checkpoint_write_that_dies_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from machinery import checkpoint
    from machinery.config import Config
    run = type("R", (), {"model": torch.nn.Linear(3, 2), "classes": ["a", "b"],
                         "cfg": Config()})
    path = str(tmp_path / "last.pt")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    checkpoint.save_checkpoint(run, path, epoch=1)
    assert synced and os.listdir(tmp_path) == ["last.pt"]  # flushed to disk; no temporary left

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with torch.no_grad():
        run.model.weight.add_(1)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(run, path, epoch=2)
    assert os.listdir(tmp_path) == ["last.pt"]
    saved = torch.load(path, weights_only=True)  # the previous checkpoint, intact
    assert saved["epoch"] == 1 and not torch.equal(saved["model"]["weight"], run.model.weight)


def test_a_damaged_last_pt_says_what_to_do(tmp_path):
    from machinery.checkpoint import resume_from
    from machinery.config import parse_args
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    (run / "stage1_32.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"last.pt is damaged \(.*\), so the run cannot go on "
                       r"from it\. Start it again with --overwrite; or train the stages after "
                       r"stage1_32.pt from its weights: python train.py --weights .*stage1_32"):
        resume_from(parse_args(["--resume", str(run)]))
    torch.save({"model": {}}, run / "last.pt")  # a torch file, but not a last.pt
    with pytest.raises(SystemExit, match="last.pt is damaged"):
        resume_from(parse_args(["--resume", str(run)]))


def test_a_resumed_log_keeps_the_steps_of_the_epochs_its_checkpoint_holds(tmp_path):
    # an epoch logged after the last checkpoint the run could write (its writer was busy, or
    # the kill came between) is trained again on resume: its steps must not be there twice
    from machinery.epochs import MetricsLog
    (tmp_path / "steps.csv").write_text("epoch,step,loss\n1,1,2.5\n1,2,2.0\n2,1,1.5\n2,2,1.")
    run = type("R", (), {"dir": str(tmp_path), "history": [{"stage": 0, "epoch": 1}]})
    with MetricsLog(run) as log:
        log.write({"stage": 0, "epoch": 2}, [1.25, 1.0])
    assert (tmp_path / "steps.csv").read_text() == \
        "epoch,step,loss\n1,1,2.5\n1,2,2.0\n2,1,1.25\n2,2,1.0\n"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
