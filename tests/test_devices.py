"""The device-dependent parts, exercised on the CPU: precision and layout as knobs, fp32 logits,
generator states across machines, the background checkpoint writer, device-specific calls."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from data import Batches, eval_batches, normalize, view
from machinery import checkpoint, devices, films
from model import autocast, build_model, class_logits, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def test_precision_and_layout_are_knobs_whose_defaults_follow_the_device():
    cuda = torch.device("cuda", 0)
    assert devices.precision(CPU, "auto") is None and devices.precision(CPU, "bf16") is \
        torch.bfloat16 and devices.precision(CPU, "fp32") is None
    assert not devices.channels_last(CPU, "auto") and devices.channels_last(CPU, "on")
    assert devices.channels_last(cuda, "auto") and not devices.channels_last(cuda, "off")
    with pytest.raises(SystemExit, match="--precision fp16: choose one of auto, bf16, fp32"):
        devices.precision(CPU, "fp16")
    with autocast(CPU, torch.bfloat16):
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype is torch.bfloat16
    with autocast(CPU, None):
        assert (torch.randn(4, 4) @ torch.randn(4, 4)).dtype is torch.float32
    opt = make_optimizer(build_model(2, "none", "resnet18"), 0.01, verbose=False)
    assert opt.defaults["fused"]  # the CPU has a fused AdamW since torch 2.4


@pytest.fixture
def tf32_flags():
    """The CUDA backends' TF32 flags, set back after the test (monkeypatch cannot: under torch
    2.11 they are not attributes it can read and undo)."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


def test_fp32_means_fp32_and_tf32_is_asked_for(tf32_flags):
    """PyTorch lets cuDNN's fp32 convolutions round to TF32 by default on Ampere and later:
    --precision fp32 (and --recipe fastai-v1's) turns that off, as a 2020 run computed;
    --precision tf32 turns it on for convolutions and matmuls; bf16 keeps its fp32 head exact."""
    from machinery.config import parse_args
    cuda = torch.device("cuda", 0)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    assert devices.precision(cuda, "fp32") is None
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert devices.arithmetic(cuda, None) == "fp32 (TF32 off)"
    assert devices.precision(cuda, "tf32") is None
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert devices.arithmetic(cuda, None) == "fp32 with TF32 convolutions and matmuls"
    assert devices.precision(CPU, "bf16") is torch.bfloat16
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert devices.arithmetic(CPU, torch.bfloat16) == "bf16 autocast"
    assert devices.precision(CPU, "tf32") is None and devices.arithmetic(CPU, None) == "fp32"
    assert parse_args(["--data", "phantom", "--recipe", "fastai-v1"]).precision == "fp32"


def test_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(4, "none", "resnet18").eval().to(memory_format=torch.channels_last)
    films_u8 = torch.randint(0, 256, (6, 1, 40, 40), dtype=torch.uint8)
    logits = class_logits(model, model, eval_batches(films_u8, 32, channels_last=True),
                          torch.bfloat16)
    assert logits.dtype is torch.float32
    # not bf16 values cast up: the head ran in fp32 (bf16 keeps 8 bits of mantissa)
    assert (logits != logits.bfloat16().float()).any()
    x = normalize(view(films_u8.float() / 255, 32), True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        features = model.body(x)
    assert features.dtype is torch.bfloat16  # the body did run in bf16
    with torch.no_grad():
        assert torch.allclose(model.head(features.float()), logits, rtol=0, atol=1e-5)


def test_rng_state_of_a_cpu_run_never_touches_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CPU run asked CUDA for its generators")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", boom)
    monkeypatch.setattr(torch.cuda, "get_rng_state", boom)
    s = checkpoint.rng_state(CPU)
    assert s["cuda"] is None
    assert checkpoint.set_rng_state(s, CPU) is None  # nothing to say: all restored


def test_a_cuda_state_from_a_machine_with_more_gpus_restores_on_fewer(monkeypatch):
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # 8 GPUs saved
    set_to = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: set_to.append((s, d)))
    s = checkpoint.rng_state(CPU)
    for saved, dev, expect in [(states, torch.device("cuda", 0), 0),
                               (states, torch.device("cuda", 3), 3),
                               (states[:1], torch.device("cuda", 1), 0),  # one saved, 2nd GPU
                               (states[5], torch.device("cuda", 0), 5)]:  # this code's form
        set_to.clear()
        assert checkpoint.set_rng_state({**s, "cuda": saved}, dev) is None
        assert len(set_to) == 1 and torch.equal(set_to[0][0], states[expect])
        assert set_to[0][1] == dev
    set_to.clear()
    note = checkpoint.set_rng_state({**s, "cuda": states}, CPU)  # GPU -> CPU
    assert not set_to and "saved on a GPU, resumed on the CPU" in note
    note = checkpoint.set_rng_state({**s, "cuda": None}, torch.device("cuda", 0))  # CPU -> GPU
    assert not set_to and "saved on the CPU, resumed on a GPU" in note


def test_an_epochs_batches_depend_on_seed_and_epoch_alone():
    images = torch.randint(0, 256, (40, 1, 24, 24), dtype=torch.uint8)
    labels = torch.arange(40) % 4

    def epoch(b, e):
        return [(x.clone(), y.clone()) for x, y in b.epoch(e)]
    used = Batches(images, labels, 8, 16, seed=5)
    for e in range(3):  # an uninterrupted run draws epochs 0, 1, 2
        last = epoch(used, e)
    fresh = Batches(images, labels, 8, 16, seed=5)  # a resumed one starts at epoch 2
    fresh.gen.set_state(torch.Generator().manual_seed(99).get_state())  # any state before
    again = epoch(fresh, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(last, again))
    assert not torch.equal(epoch(fresh, 1)[0][1], last[0][1])  # another epoch, another order


class _Run:
    def __init__(self):
        from machinery.config import Config
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1, fused=True)
        self.classes, self.cfg, self.device = ["a", "b"], Config(), CPU

    def train_step(self):
        self.model(torch.randn(4, 3)).sum().backward()
        self.opt.step()
        self.opt.zero_grad()


def test_checkpoint_writer_never_overwrites_the_snapshot_it_is_writing(tmp_path, monkeypatch):
    run, path = _Run(), str(tmp_path / "last.pt")
    ck = checkpoint.Checkpointer(run, path)
    release, real_save = threading.Event(), checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint",
                        lambda *a, **k: (release.wait(10), real_save(*a, **k)))
    run.train_step()
    ck.take(epoch=1)
    w1 = run.model.weight.detach().clone()
    assert ck.write()  # a slow disk: this write is still going ...
    for epoch in (2, 3):  # ... while two more epochs end
        run.train_step()
        ck.take(epoch=epoch)
        assert not ck.write()  # skipped, training not held up
    release.set()
    ck.close()
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["model"]["weight"], w1)
    assert ck.stats["writes"] == 1 and ck.stats["skipped"] == 2
    assert ck.write()  # the writer is free: the newest snapshot goes out
    ck.close()
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 3 and torch.equal(saved["model"]["weight"], run.model.weight)
    assert set(saved) >= {"model", "opt", "rng", "classes", "config"}


def test_restore_goes_back_to_the_snapshot_and_does_not_alias_it(tmp_path):
    run = _Run()
    ck = checkpoint.Checkpointer(run, str(tmp_path / "last.pt"))
    run.train_step()
    ck.take()
    good_w = run.model.weight.detach().clone()
    good_m = {k: v.clone() for k, v in run.opt.state_dict()["state"][0].items()}
    run.train_step()
    ck.restore()
    assert torch.equal(run.model.weight, good_w)
    assert all(torch.equal(run.opt.state_dict()["state"][0][k], v) for k, v in good_m.items())
    run.train_step()  # the optimizer's state is its own, not the snapshot's buffers
    assert torch.equal(ck.bufs[ck.newest]["opt"]["state"][0]["exp_avg"], good_m["exp_avg"])


def test_write_errors_surface_and_save_every_spaces_writes(tmp_path, monkeypatch):
    run = _Run()
    ck = checkpoint.Checkpointer(run, str(tmp_path / "last.pt"), every=3600)
    ck.take(epoch=1)
    assert ck.write()  # the first: written
    ck.close()
    ck.take(epoch=2)
    assert not ck.write()  # within the hour: not written
    ck.every = 0

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    assert ck.write()
    with pytest.raises(OSError, match="No space left"):
        ck.close()  # raised in the training thread, not lost in the writer's


def test_device_calls_name_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(
        ("reset", d)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: calls.append(
        ("peak", d)) or 2 ** 30)
    dev = torch.device("cuda", 1)
    devices.sync(dev), devices.reset_peak(dev)
    assert devices.peak_gib(dev) == 1.0
    assert calls == [("sync", dev), ("reset", dev), ("peak", dev)]
    calls.clear()
    devices.sync(CPU), devices.reset_peak(CPU)
    assert devices.peak_gib(CPU) is None and not calls


def test_process_pools_start_from_a_forkserver_that_preloads_torch_and_films():
    import multiprocessing.forkserver
    with films.process_pool(1) as pool:
        assert pool._mp_context.get_start_method() == "forkserver"
        assert list(pool.map(films.stored_size, [64, 64], ["crop", "squish"], [1.5, 1.5])) == \
            [96, 64]  # a films function, run in a worker
    assert "machinery.films" in multiprocessing.forkserver._forkserver._preload_modules
    assert ROOT in os.environ["PYTHONPATH"].split(os.pathsep)  # the server finds films


def test_a_pool_decodes_only_what_takes_longer_than_starting_one(tmp_path, monkeypatch):
    from PIL import Image
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((np.arange(400).reshape(20, 20) * (i + 1) % 256).astype(np.uint8)).save(
            paths[-1])
    started, real_pool = [], films.process_pool

    def pool(workers):
        started.append(workers)
        return real_pool(workers)
    monkeypatch.setattr(films, "process_pool", pool)
    with films.decode_all(paths, [8], 2, first=4) as results:
        here = list(results)
    assert not started  # 12 small films: quicker here than a pool's start
    monkeypatch.setattr(films, "POOL_START_S", 0.0)  # as if each film took long
    with films.decode_all(paths, [8], 2, first=4) as results:
        pooled = list(results)
    assert started == [2]
    assert [r[0] for r in here] == [r[0] for r in pooled] == [(20, 20)] * 12
    assert all(np.array_equal(a[1][0], b[1][0]) for a, b in zip(here, pooled))  # in order


def test_optimizer_state_takes_its_parameters_layout_when_loaded():
    """A run saved with NCHW weights (the CPU) and resumed with channels_last ones (a GPU):
    CUDA's fused AdamW needs each moment in its parameter's layout."""
    torch.manual_seed(0)
    nchw = torch.nn.Conv2d(3, 4, 3)
    opt = torch.optim.AdamW(nchw.parameters(), lr=0.1, fused=True)
    nchw(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    nhwc = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    nhwc.load_state_dict(nchw.state_dict())
    opt2 = torch.optim.AdamW(nhwc.parameters(), lr=0.1, fused=True)
    checkpoint.load_optimizer(opt2, opt.state_dict())
    w = nhwc.weight
    assert w.is_contiguous(memory_format=torch.channels_last)
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[w][k].stride() == w.stride()
        assert torch.equal(opt2.state[w][k], opt.state[nchw.weight][k])


def test_resume_on_the_cpu_of_a_run_saved_on_a_gpu(tmp_path, capsys):
    """A last.pt as an 8-GPU machine wrote it before 2026-11-27 (8 CUDA generator states and
    a 16-byte CUDA batch generator): the CPU resume goes on, and says it is not bit-exact."""
    import train
    from machinery.config import parse_args
    train.main(parse_args([
        "--data", "phantom", "--phantoms", "64", "--arch", "resnet18", "--weights", "none",
        "--device", "cpu", "--stages", "32", "--frozen-epochs", "0", "--unfrozen-epochs", "2",
        "--batch-size", "16", "--lr-find-steps", "4", "--cache-dir", "", "--keep-last", "--runs",
        str(tmp_path), "--name", "r"]))
    last = tmp_path / "r" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["history"] = state["history"][:1]  # as if killed after epoch 1
    state["epoch"] = 1
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    state["batches_gen"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, last)
    capsys.readouterr()
    train.main(parse_args(["--resume", str(tmp_path / "r")]))
    assert "saved on a GPU, resumed on the CPU" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [row["epoch"] for row in rows] == [1, 2]


def test_inductor_compiles_the_model_and_the_step_compiles_in_bf16_and_channels_last(tmp_path):
    """Inductor generates kernels here too (C++ on the CPU, Triton on a GPU) for the model in
    bf16 autocast and NHWC with its fp32 head, against eager; and the real step (forward and
    backward, fused AdamW) runs through torch.compile's graph capture (aot_eager: traced, no
    code generation; inductor compiles the backward graph too on a GPU: bench.py --gpu-check)."""
    from machinery.config import parse_args
    from machinery.run import forwards, setup
    from model import train_step
    run = setup(parse_args([
        "--data", "phantom", "--phantoms", "40", "--arch", "resnet18", "--weights", "none",
        "--device", "cpu", "--stages", "32", "--precision", "bf16", "--channels-last", "on",
        "--compile", "on", "--compile-backend", "aot_eager", "--cache-dir", "", "--runs",
        str(tmp_path)]))
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 4
    run.model.eval()  # no dropout, BN's running statistics: the same function both ways
    with torch.no_grad(), autocast(CPU, run.amp_dtype):
        eager = run.model(x)
        compiled = torch.compile(run.model, dynamic=False, backend="inductor")(x)
    assert compiled.dtype is torch.float32
    assert torch.allclose(compiled, eager, rtol=0.05, atol=0.05)  # bf16 rounding apart
    run.model.train()
    run.forward, run.infer = forwards(run, compiled=True)
    assert run.forward is run.compiled and run.compiled is not run.model
    before = run.model.head[-1].weight.detach().clone()
    losses = [train_step(run.forward, run.opt, x, y, run.amp_dtype) for _ in range(2)]
    assert all(torch.isfinite(loss) and loss.dtype is torch.float32 for loss in losses)
    assert not torch.equal(run.model.head[-1].weight, before)  # the optimizer stepped


def test_a_compiled_run_trains_what_requires_grad_says_as_eager_does(tmp_path):
    """One stage at one size, head (frozen) then all layers (unfrozen), as train.py runs it
    (start_phase, fit), eager and compiled (aot_eager): the body's convolutions must stay put
    while frozen and all move when unfrozen, both ways. On torch 2.11, whose guards ignore
    requires_grad, the frozen phase's graph was reused after unfreezing: 0 of 20 moved.
    aot_eager runs torch's own kernels, so compiled and eager agree to 1e-6 (bit for bit with
    torch 2.11 and 2.14 on this CPU); a body that did not train is ~1e-2 away."""
    import data
    import train
    from machinery.config import make_stages, parse_args
    from machinery.epochs import MetricsLog
    from benchmarks.measure import body_convs as convs
    from machinery.run import setup

    def trained(compile):
        cfg = parse_args([
            "--data", "phantom", "--phantoms", "64", "--arch", "resnet18", "--weights", "none",
            "--device", "cpu", "--stages", "32", "--frozen-epochs", "1", "--unfrozen-epochs",
            "1", "--batch-size", "16", "--lr-frozen", "1e-3", "--lr-unfrozen", "1e-3",
            "--compile", compile, "--compile-backend", "aot_eager", "--cache-dir", "",
            "--runs", str(tmp_path), "--name", compile])
        run = setup(cfg)
        plan = train.make_plan(cfg, make_stages(cfg), len(run.items["train"]), run.device)
        assert [(p.name, p.compiled) for p in plan] == [("frozen", compile == "on"),
                                                        ("unfrozen", compile == "on")]
        films = data.stage_films(run, 32)
        weights, previous = [convs(run.model)], None
        with MetricsLog(run) as log:
            for phase in plan:
                train.start_phase(run, phase, previous)
                train.fit(run, phase, train.max_lrs(run, films, phase), films, log)
                weights.append(convs(run.model))
                previous = phase
        moved = [sum(not torch.equal(a, b) for a, b in zip(w0, w1))
                 for w0, w1 in zip(weights, weights[1:])]
        return moved, run.model.state_dict()

    eager_moved, eager = trained("off")
    compiled_moved, compiled = trained("on")
    assert eager_moved == compiled_moved == [0, 20]  # ResNet-18's body: 20 convolutions
    for k in eager:
        assert torch.allclose(compiled[k].float(), eager[k].float(), rtol=0, atol=1e-6), k
