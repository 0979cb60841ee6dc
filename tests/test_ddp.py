"""Data-parallel training under torchrun (gloo, 2 CPU processes) and data larger than memory
(memory-mapped cache, films left in host memory)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import evaluate
import train
from data import Augment, Batches
from machinery import ddp, films
from machinery.config import Config, parse_args
from machinery.datasets import load_dataset
from machinery.hostmem import HostImages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "cxr-sample")
# Tiny phantom runs: both LR finders, one-cycle and evaluation, a few seconds per process.
# --ps 0: the head's dropout draws its masks per process, so 2 ranks could never draw what
# one process draws; without it every random draw of the run is shared (data.py).
TINY = ["--demo", "--stages", "32", "--frozen-epochs", "1", "--unfrozen-epochs", "2",
        "--phantoms", "128", "--lr-find-steps", "6", "--ps", "0"]


def env(tmp):
    """One thread per rank (2 ranks, 2 cores); torchrun's log folders in the test's folder."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}


def torchrun(args, tmp, n=2):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={n}", "train.py", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(tmp))


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_ranks_take_disjoint_slices_of_the_global_batch_and_its_augmentation():
    n, bs = 70, 8
    images = torch.randint(0, 256, (n, 1, 24, 24), dtype=torch.uint8)
    ids = torch.arange(n)  # labels that name the films
    one = list(Batches(images, ids, 2 * bs, 16, aug=Augment(), seed=3).epoch(1))
    two = [list(Batches(images, ids, bs, 16, aug=Augment(), seed=3, rank=r, world=2).epoch(1))
           for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == n // (2 * bs)
    seen = torch.cat([y for r in two for _, y in r])
    assert len(set(seen.tolist())) == len(seen) == len(one) * 2 * bs  # each film once
    for (x, y), (x0, y0), (x1, y1) in zip(one, *two):
        # rank 0's batch is the first half of one process's, rank 1's the second half,
        # augmentation included
        assert torch.equal(y, torch.cat([y0, y1]))
        assert torch.equal(x, torch.cat([x0, x1]))


def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(tmp_path):
    """torchrun, 2 gloo ranks x batch 16 with --sync-bn against 1 process x batch 32: the
    same films, augmentation, LR-finder curves and updates. What differs is the order of
    float sums (gradients averaged over ranks, global BatchNorm sums in one pass), ~1e-7
    relative per operation; over 9 Adam steps it stays near 1e-6 (measured). 1e-4 leaves
    room, and any sampling or scaling mistake shows at 1e-2 (the head's dropout alone moved
    the first epoch's loss by 1%). Two stages: rank 1, with no run folder, goes past the
    first stage's checkpoint (rank 0's alone)."""
    runs, two_stages = str(tmp_path), ["--stages", "32,40", "--unfrozen-epochs", "2,1",
                                       "--frozen-epochs", "1,0"]
    p = torchrun([*TINY, *two_stages, "--batch-size", "16", "--sync-bn", "--runs", runs,
                  "--name", "two"], tmp_path)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    train.main(parse_args([*TINY, *two_stages, "--batch-size", "32", "--runs", runs, "--name",
                           "one"]))
    two, one = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["max_lrs"] for r in two] == [r["max_lrs"] for r in one]  # the finders agree
    for a, b in zip(two, one):
        for k in ("train_loss", "val_loss", "val_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (k, a, b)
    assert two[0]["ranks"] == 2
    m = json.load(open(tmp_path / "two" / "test_metrics.json"))
    assert m["ranks"] == {"n": 2, "same_model": True}  # rank 1 ends with rank 0's weights
    assert m["accuracy"]["value"] == pytest.approx(
        json.load(open(tmp_path / "one" / "test_metrics.json"))["accuracy"]["value"])
    # rank 0 alone writes (the others have no run folder to write to): the same files
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert json.load(open(tmp_path / "two" / "config.json"))["ranks"] == 2
    assert "stage1_32.pt" in os.listdir(tmp_path / "two")
    assert out.count("== stage 2/2") == 1  # one log: rank 0's


COLLECTIVES = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
import time
import torch.distributed as dist
from machinery import ddp
ddp.init("cpu", 3.0)  # seconds: node_first's waits may be longer
r = ddp.rank()
with ddp.node_first():  # the first rank "decodes" for longer than --dist-timeout
    if ddp.local_main():
        time.sleep(4)
    done = time.time()
first, other = ddp.all_objects(done)
assert other >= first  # rank 1's turn came after rank 0's 4 s
for n in (1, 3, 8):  # fewer rows than ranks: rank 1 has none, and gathers all the same
    lo, hi = ddp.shard(n)
    mine = torch.arange(n * 2.0).view(n, 2)[lo:hi]
    assert torch.equal(ddp.gather_rows(mine, n), torch.arange(n * 2.0).view(n, 2)), n
assert ddp.shard(1) == ((0, 0), (0, 1))[r] and ddp.shard(3) == ((0, 1), (1, 3))[r]
assert ddp.all_objects({"rank": r}) == [{"rank": 0}, {"rank": 1}]
ddp.seed_rank(5)
draws = ddp.all_objects(torch.rand(3))
assert not torch.equal(draws[0], draws[1])  # each rank its own dropout masks
try:
    with ddp.fail_together():
        if ddp.main():
            raise SystemExit("the run folder is full")
except SystemExit as e:
    print(f"rank {r} stopped: {e}", force=True)
try:
    with ddp.closing():  # both ranks fail: the group is left at once, no barrier
        raise SystemExit("the end")
except SystemExit:
    assert not dist.is_initialized()
"""


def test_collectives_for_uneven_shards_and_a_failure_of_rank_0_alone(tmp_path):
    """gather_rows when a rank has no rows; fail_together(): what fails on rank 0 alone stops every
    rank with rank 0's message (rather than leaving rank 1 at its next collective); node_first():
    the other ranks wait for the first longer than --dist-timeout (3 s here)."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), ROOT], capture_output=True,
                       text=True, timeout=120, env=env(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for r in (0, 1):
        assert f"rank {r} stopped: rank 0: the run folder is full" in p.stdout


@pytest.fixture
def group(tmp_path):
    """A process group of one gloo process, this one (init_process_group as torchrun's ranks
    call it, with a file for the rendezvous); left if the test did not leave it."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def sbn_loss(x):
    return (ddp.sum_over_ranks(x * 2) * 4).sum()


def test_the_sum_over_ranks_keeps_its_gradient_when_compiled(group):
    """--sync-bn on CPU ranks under --compile on: CPUSyncBatchNorm's sum over the ranks runs
    eager inside the compiled model (torch 2.11 compiled its all_reduce's gradient to zeros)."""
    for loss in (sbn_loss, torch.compile(sbn_loss, backend="aot_eager")):
        x = torch.ones(3, requires_grad=True)
        loss(x).backward()
        assert x.grad.tolist() == [8.0, 8.0, 8.0]


@pytest.mark.parametrize("error", [RuntimeError("a rank failed"), SystemExit("data error")])
def test_the_process_group_is_left_when_training_fails_without_waiting_for_the_others(
        group, monkeypatch, error):
    """train.py's `with ddp.closing()`: an error leaves the group at once, with no barrier
    (the other ranks may be dead: a barrier would wait --dist-timeout for them)."""
    def no_barrier(*a, **k):
        raise AssertionError("a barrier on the way out of an error")
    monkeypatch.setattr(dist, "barrier", no_barrier)
    with pytest.raises(type(error), match=str(error)):
        with ddp.closing():
            raise error
    assert not dist.is_initialized()


def test_the_process_group_is_left_after_a_barrier_when_training_ends(group, monkeypatch):
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(dist.is_initialized()))
    with ddp.closing():
        pass
    assert barriers == [True] and not dist.is_initialized()  # all ranks together, then left
    # a node that dies leaves the others waiting this long, at most, not half an hour
    assert Config().dist_timeout <= 600


def worker(local_rank, parent):
    """The pid of torchrun's worker process with this LOCAL_RANK."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    return None


def test_a_killed_rank_ends_the_job_and_resume_under_torchrun_goes_on(tmp_path):
    run_dir = tmp_path / "k"
    p = torchrun([*TINY, "--frozen-epochs", "0", "--unfrozen-epochs", "8", "--batch-size",
                  "16", "--runs", str(tmp_path), "--name", "k"], tmp_path)
    t0 = time.time()
    while time.time() - t0 < 200 and p.poll() is None:
        if (run_dir / "last.pt").exists() and len(rows(run_dir)) >= 3:
            break
        time.sleep(0.05)
    pid = worker(1, p.pid)
    assert pid and p.poll() is None, "the run ended before it could be killed"
    os.kill(pid, signal.SIGKILL)
    out = p.communicate(timeout=120)[0]  # rank 0 does not wait for rank 1 forever
    assert p.returncode != 0
    assert "local_rank: 1" in out and "SIGKILL" in out  # torchrun names the rank that died
    assert not (run_dir / "test_metrics.json").exists()
    last = torch.load(run_dir / "last.pt", weights_only=True)
    done = len(last["history"])
    r0, r1 = last["rng_ranks"]  # every rank's generators, saved by rank 0
    assert not torch.equal(r0["torch"], r1["torch"])  # each rank's own dropout stream
    assert 1 <= done < 8  # last.pt: the last finished write, one epoch behind at most
    p = torchrun(["--resume", str(run_dir)], tmp_path)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-3000:]
    assert f"after epoch {done} of unfrozen" in out
    assert [r["epoch"] for r in rows(run_dir)] == list(range(1, 9))  # each epoch once
    assert json.load(open(run_dir / "test_metrics.json"))["ranks"]["same_model"]


needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="no ../shared sample")


@needs_sample
def test_cache_is_memory_mapped_and_a_stage_is_materialised_alone(tmp_path):
    _, splits = load_dataset(SAMPLE)
    items = splits["test"]
    decoded = films.load_pixels(items, [24, 32], str(tmp_path), "crop")
    mapped = films.load_pixels(items, [24, 32], str(tmp_path), "crop")  # from the cache
    # built straight into the cache files, then read from them: never whole in memory
    assert all(isinstance(a, np.memmap) for f in (decoded, mapped) for a in f.images.values())
    part = mapped.subset([5, 0, 3])
    x = part.to(32, "cpu", chunk=100)  # a few films per copy
    assert torch.equal(x, torch.from_numpy(decoded.images[32][[5, 0, 3]]))
    assert part.nbytes(32) == 3 * decoded.images[32][0].size
    host = HostImages(part, 24, torch.device("cpu"))
    assert len(host) == 3 and torch.equal(host[1:], torch.from_numpy(
        decoded.images[24][[0, 3]]))


@needs_sample
def test_films_in_host_memory_train_as_films_on_the_device(tmp_path, capsys):
    """--data-on cpu, here chosen by auto for films over a tiny budget (what a data set larger
    than the GPU does): batches gathered from the memory-mapped cache give the run the films
    on the device gives, bit for bit."""
    base = ["--data", SAMPLE, "--arch", "resnet18", "--weights", "none", "--device", "cpu",
            "--stages", "24,32", "--frozen-epochs", "0", "--unfrozen-epochs", "1,2",
            "--batch-size", "16", "--lr-find-steps", "6", "--runs", str(tmp_path)]
    cache = str(tmp_path / "cache")
    dev = train.main(parse_args([*base, "--data-on", "gpu", "--cache-dir", "", "--name", "a"]))
    train.main(parse_args([*base, "--cache-dir", cache, "--name", "warm-up"]))
    assert "in host memory" not in capsys.readouterr().out
    host = train.main(parse_args([*base, "--data-on", "auto", "--data-gpu-gib", "0.0001",
                                  "--cache-dir", cache, "--name", "b"]))
    assert "films at 32 px: 0.00 GiB, in host memory" in capsys.readouterr().out
    assert rows(tmp_path / "a") == [{**r, "time": a["time"], "img_s": a["img_s"]}
                                    for r, a in zip(rows(tmp_path / "b"), rows(tmp_path / "a"))]
    assert host["accuracy"] == dev["accuracy"]
    assert open(tmp_path / "a" / "test_predictions.csv").read() == \
        open(tmp_path / "b" / "test_predictions.csv").read()
    # evaluate.py too: the test split's films in host memory, batches copied
    m = evaluate.main([str(tmp_path / "b"), "--data", SAMPLE, "--data-on", "cpu",
                       "--cache-dir", cache, "--device", "cpu", "--out", str(tmp_path / "e")])
    assert "films of the test split at 32 px: 0.00 GiB, in host memory" in \
        capsys.readouterr().out
    assert m["accuracy"]["value"] == host["accuracy"]["value"]

