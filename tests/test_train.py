"""End to end: tiny three-stage runs on phantoms and on the real sample, and the command line."""
import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import data
import lrfind
import train
from machinery import devices
from machinery.config import make_stages, parse_args
from machinery.epochs import MetricsLog
from machinery.run import setup
from model import build_model, class_logits, train_step
from schedule import MaxLR
from train import Phase

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cxr-sample")
# Small sizes, ResNet-18 and few steps keep each run to a few dozen CPU seconds
TINY = ["--arch", "resnet18", "--weights", "none", "--device", "cpu", "--stages", "32,40,48",
        "--frozen-epochs", "1,0,0", "--unfrozen-epochs", "2,2,3", "--batch-size", "16",
        "--lr-find-steps", "16", "--lr-find-start", "1e-5", "--lr-find-end", "1",
        "--lr-find-beta", "0.9", "--lr-unfrozen", "auto,auto,1e-4:1e-2"]


def check_run_folder(run_dir, classes, n_epochs):
    files = set(os.listdir(run_dir))
    assert {"config.json", "classes.json", "metrics.jsonl", "test_metrics.json",
            "model.pt", "stage1_32.pt", "stage2_40.pt"} <= files
    gallery = Image.open(os.path.join(run_dir, "top_losses.png"))  # the 9 worst test films
    assert gallery.size == (3 * 224, 3 * (224 + 22) + 30)
    assert "![top losses](top_losses.png)" in open(os.path.join(run_dir, "report.md")).read()
    card = open(os.path.join(run_dir, "MODEL_CARD.md")).read()  # what it is and is not for
    assert "Not a medical device" in card and "## Test metrics" in card and "accuracy" in card
    assert "`arch` 'resnet18' (paper 'resnet50')" in card and "Classes, in output order: " + \
        ", ".join(classes) in card
    # the last stage's weights are model.pt alone; last.pt (for --resume) goes at the end
    assert not {"stage3_48.pt", "last.pt"} & files
    assert torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["size"] == 48
    # an LR finder curve for each 'auto' phase: s1 frozen, s1 and s2 unfrozen
    for tag in ("s1_32_frozen", "s1_32_unfrozen", "s2_40_unfrozen"):
        assert {f"lrfind_{tag}.csv", f"lrfind_{tag}.png"} <= files
    assert "lrfind_s3_48_unfrozen.csv" not in files  # stage 3 had explicit LRs
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    assert cfg["stages"] == "32,40,48" and "git_commit" in cfg
    assert cfg["git_dirty"] in (True, False, None)  # None: not a git checkout
    assert json.load(open(os.path.join(run_dir, "classes.json"))) == classes
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert len(rows) == n_epochs
    steps = list(csv.DictReader(open(os.path.join(run_dir, "steps.csv"))))  # every step's loss
    for n, row in enumerate(rows, 1):
        losses = [float(s["loss"]) for s in steps if int(s["epoch"]) == n]
        assert losses and sum(losses) / len(losses) == pytest.approx(row["train_loss"], rel=1e-5)
    table = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))  # the same
    assert [(r["phase"], float(r["train_loss"])) for r in table] == [
        (r["phase"], r["train_loss"]) for r in rows]
    assert rows[-1]["phase"] == "s3_48_unfrozen" and rows[-1]["lr"] == pytest.approx(1e-2)
    # the run's one-page report and its plots
    for png, size in [("loss.png", (800, 500)), ("accuracy.png", (800, 500)),
                      ("roc.png", (800, 500)),
                      ("confusion_matrix.png", None)]:
        img = Image.open(os.path.join(run_dir, png))
        assert size is None or img.size == size
        assert len(np.unique(np.asarray(img.convert("L")))) > 10, png  # not blank
    report = open(os.path.join(run_dir, "report.md")).read()
    data = report.split("## Data")[1].split("## Test split")[0]  # every run says what it read
    if cfg["data"] == "phantom":  # true to its data: no patients, sources or ages
        assert "A demonstration, not a classifier of radiographs" in card
        assert "public research" not in card and "patients' ages" not in card
        assert f"{cfg['phantoms']} training films and a test split drawn from seed 0 " \
            "(`--data phantom`), synthetic phantoms" in data
        assert f"Test split: {classes[0]} " in data  # its films by class
    else:
        assert "public research images" in card and "| source |" in data
    for part in ("## Stages", "| s3_48_unfrozen | 3 |", "![s1_32_frozen](lrfind_s1_32_frozen.png)",
                 "confusion matrix (rows: true", "![ROC curves](roc.png)", '"stages": "32,40,48"'):
        assert part in report, part
    with open(os.path.join(run_dir, "test_predictions.csv")) as f:
        preds = list(csv.DictReader(f))
    assert [p["label"] for p in preds][:1] and set(p["predicted"] for p in preds) <= set(classes)
    ck = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert ck["classes"] == classes and ck["config"]["arch"] == "resnet18"
    m = build_model(len(classes), os.path.join(run_dir, "model.pt"), "resnet18")
    assert torch.equal(m.head[7].weight, ck["model"]["head.7.weight"])
    return rows, json.load(open(os.path.join(run_dir, "test_metrics.json")))


def test_tiny_three_stage_run_on_phantoms_beats_chance(tmp_path, capsys):
    cfg = parse_args(["--data", "phantom", "--phantoms", "320", "--runs", str(tmp_path),
                            "--name", "ph", "--cache-dir", ""] + TINY)
    m = train.main(cfg)
    rows, saved = check_run_folder(tmp_path / "ph", ["COVID-19", "bacterial", "normal", "viral"],
                                   8)
    assert saved["accuracy"] == m["accuracy"] and saved["n"] == 64
    assert all(0 <= saved["per_class"][c]["roc_auc"] <= 1 for c in saved["classes"])
    assert m["accuracy"]["value"] > 0.45  # chance is 0.25 for four balanced classes
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    out = capsys.readouterr().out
    assert "stage 3/3: 48 px" in out and "sensitivity" in out and "confusion matrix" in out
    assert "max LR per group stem-layer2 1.0e-04, layer3-layer4 1.0e-03, head 1.0e-02" in out


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/data/cxr-sample absent")
def test_tiny_three_stage_run_on_the_real_sample(tmp_path):
    cache = tmp_path / "cache"
    cfg = parse_args(["--data", SAMPLE, "--runs", str(tmp_path), "--name", "real",
                            "--cache-dir", str(cache)] + TINY)
    m = train.main(cfg)
    rows, saved = check_run_folder(tmp_path / "real", ["COVID-19", "normal", "pneumonia"], 8)
    assert m["n"] == 47 and sum(map(sum, m["confusion_matrix"])) == 47
    assert set(m["per_source"]) == {"actualmed", "figure1", "kermany", "nih"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # train and test: three sizes and the films' sizes, each with its CRC-32
    assert len(os.listdir(cache)) == 16 and len(glob.glob(os.path.join(cache, "*.npy"))) == 8


def test_lrfind_runs_on_its_own(tmp_path):
    lr = lrfind.main(["--data", "phantom", "--phantoms", "64", "--size", "32", "--arch",
                      "resnet18", "--weights", "none", "--device", "cpu", "--batch-size", "16",
                      "--lr-find-steps", "12", "--runs", str(tmp_path), "--name", "f",
                      "--cache-dir", ""])
    assert 1e-7 <= lr <= 10
    assert {"lrfind_32_frozen.csv", "lrfind_32_frozen.png"} <= set(os.listdir(tmp_path / "f"))
    kind = json.load(open(tmp_path / "f" / "lrfind.json"))
    assert kind["kind"] == "lrfind" and kind["lr"] == lr and kind["phase"] == "frozen"
    # its own kind: compare.py skips it with a word, ablate.py never writes over it
    import ablate
    import compare
    with pytest.raises(compare.CompareError, match="an LR finder's folder"):
        compare.load_run(str(tmp_path / "f"))
    assert ablate.state(str(tmp_path / "f")) == "lrfind"
    status, _, _ = ablate.run_one({"dir": str(tmp_path / "f"), "args": []}, str(tmp_path))
    assert status.startswith("failed") and "LR finder" in status


def test_stages_are_data_from_the_command_line(capsys):
    cfg = parse_args(["--data", "phantom"])
    st = make_stages(cfg)  # the paper's schedule by default: 41 epochs
    assert [(s.size, s.frozen_epochs, s.unfrozen_epochs) for s in st] == \
        [(128, 3, 5), (224, 3, 5), (229, 0, 25)]
    assert sum(s.frozen_epochs + s.unfrozen_epochs for s in st) == 41
    assert st[2].lr_unfrozen == "1e-6:1e-4" and st[0].lr_frozen == "auto"
    assert all(s.batch_size == 64 for s in st)
    cfg = parse_args(["--data", "phantom", "--stages", "64,96", "--frozen-epochs", "0",
                            "--unfrozen-epochs", "1,2", "--lr-unfrozen", "1e-3"])
    assert [(s.size, s.frozen_epochs, s.unfrozen_epochs) for s in make_stages(cfg)] == \
        [(64, 0, 1), (96, 0, 2)]
    # the paper's lists are cut to the stages given; lists given explicitly must fit
    st = make_stages(parse_args(["--data", "phantom", "--stages", "64,96"]))
    assert [(s.frozen_epochs, s.unfrozen_epochs, s.lr_unfrozen) for s in st] == \
        [(3, 5, "auto"), (3, 5, "auto")]
    with pytest.raises(SystemExit):
        parse_args(["--data", "phantom", "--stages", "64,96", "--lr-unfrozen", "1,2,3"])
    assert "--lr-unfrozen has 3 values for 2 stages" in capsys.readouterr().err


def test_demo_defaults_can_be_overridden_and_data_is_required(capsys):
    cfg = parse_args(["--demo", "--stages", "32,40,48"])
    assert cfg.data == "phantom" and cfg.weights == "none" and cfg.stages == "32,40,48"
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--data PATH" in capsys.readouterr().err


def test_max_lrs_forms(monkeypatch):
    from machinery.config import Config

    class R:  # max_lrs needs the optimizer's groups, and the config
        opt = torch.optim.AdamW([{"params": [torch.zeros(1)]} for _ in range(3)])
        cfg = Config()

    def lrs(name, spec):
        return train.max_lrs(R, {"train": None}, Phase(0, name, 32, 16, 1, MaxLR.parse(spec),
                                                       False))
    monkeypatch.setattr(train, "suggest_lr", lambda *a: 1e-3)  # the LR finder's suggestion
    assert lrs("unfrozen", "1e-6:1e-4") == pytest.approx([1e-6, 1e-5, 1e-4])
    assert lrs("frozen", "3e-3") == pytest.approx([3e-3] * 3)
    assert lrs("frozen", "auto") == pytest.approx([1e-3] * 3)  # fit_one_cycle(lr)
    assert lrs("unfrozen", "auto") == pytest.approx([1e-4, 1e-4, 1e-3])  # slice(lr)
    assert lrs("unfrozen", ":1e-2") == lrs("frozen", ":1e-2") == pytest.approx(
        [1e-3, 1e-3, 1e-2])  # slice(x) as given, frozen or not
    R.cfg = Config(discriminative=False)  # one LR for all groups: the top of the range
    assert lrs("unfrozen", "1e-6:1e-4") == pytest.approx([1e-4] * 3)
    assert lrs("unfrozen", "auto") == lrs("unfrozen", ":1e-3") == pytest.approx([1e-3] * 3)
    assert lrs("frozen", "1e-6:1e-4") == pytest.approx([1e-6, 1e-5, 1e-4])


def test_the_plan_is_data_and_a_resume_is_the_plan_less_what_was_done():
    cfg = parse_args(["--data", "phantom"])
    plan = train.make_plan(cfg, make_stages(cfg), 4780, torch.device("cpu"))
    auto = MaxLR("auto")  # the LR forms, parsed when the plan is made
    assert [(p.stage, p.name, p.size, p.epochs, p.lr) for p in plan] == [
        (0, "frozen", 128, 3, auto), (0, "unfrozen", 128, 5, auto),
        (1, "frozen", 224, 3, auto), (1, "unfrozen", 224, 5, auto),
        (2, "unfrozen", 229, 25, MaxLR("lo:hi", 1e-6, 1e-4))]  # 41 epochs; stage 3 no head
    assert [p.tag for p in plan][:2] == ["s1_128_frozen", "s1_128_unfrozen"]
    assert not any(p.compiled or p.resumed for p in plan)  # no compilation on the CPU
    state = {"stage": 1, "phase_name": "unfrozen", "epoch": 2, "lrs": [1e-5, 1e-5, 1e-4]}
    rest = train.remaining(plan, state)
    assert [(p.tag, p.first_epoch, p.lrs) for p in rest] == [
        ("s2_224_unfrozen", 2, [1e-5, 1e-5, 1e-4]), ("s3_229_unfrozen", 0, None)]
    assert rest[0].resumed and not rest[1].resumed


def test_bad_data_stops_before_training_with_one_message(tmp_path):
    from test_datasets import make_covidx
    make_covidx(tmp_path / "d")
    (tmp_path / "d" / "test" / "test2.png").write_bytes(b"not a png")  # found by decoding
    nan = np.ones((40, 40), np.float32)
    nan[0, 0] = np.nan  # a float film with a NaN pixel: found by decoding, named as why
    Image.fromarray(nan).save(tmp_path / "d" / "test" / "test3.png", format="TIFF")
    os.remove(tmp_path / "d" / "train" / "train4.png")  # found by reading the split file
    with open(tmp_path / "d" / "train.txt", "a") as f:
        f.write("p9 train9.png\n")
    args = ["--data", str(tmp_path / "d"), "--runs", str(tmp_path / "runs"), "--cache-dir", ""]
    r = subprocess.run([sys.executable, "train.py"] + args + TINY, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.abspath(train.__file__)))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    msg = r.stderr.split("error: the data set is not usable:\n")[1]
    assert [line.split(" (")[0] for line in msg.splitlines() if line[2] != " "] == [
        "  1 malformed lines", "  1 listed images are missing", "  2 images could not be read"]
    assert "train.txt line 7: 'p9 train9.png'" in msg and "train4.png" in msg
    assert "test2.png (UnidentifiedImageError" in msg
    assert "test3.png (ValueError: 1 of its 1600 pixels are NaN or infinite: not a film)" in msg
    assert r.stdout == ""  # nothing began: not even a config.json to name
    assert not os.path.exists(tmp_path / "runs")


def test_class_weights_and_balance_options(tmp_path):
    cfg = parse_args(["--data", "phantom", "--phantoms", "64", "--runs", str(tmp_path),
                            "--cache-dir", "", "--class-weights", "--balance"] + TINY)
    run = setup(cfg, sizes=[32])
    counts = torch.bincount(torch.tensor(run.items["train"].labels), minlength=4).float()
    expect = counts.sum() / (4 * counts)  # inverse frequency, mean weight 1 over images
    assert torch.allclose(run.loss_weight, expect)
    batches = data.train_batches(run, data.stage_films(run, 32)["train"], 32, 16, "t")
    assert batches.balance and len(batches) == len(run.items["train"]) // 16


def test_class_logits_every_image_once_in_order():
    torch.manual_seed(0)
    model = build_model(3, "none", "resnet18").eval()
    images = torch.randint(0, 256, (10, 1, 32, 32), dtype=torch.uint8)
    shapes = []

    def compiled(x):  # stands in for torch.compile(model): any forward that is not the model
        shapes.append(len(x))
        return model(x)
    logits = class_logits(model, compiled, data.eval_batches(images, 32, batch_size=4,
                                                             pad=True))
    assert logits.shape == (10, 3) and shapes == [4, 4, 4]  # 4 + 4 + 2, padded: one shape
    with torch.no_grad():
        direct = model(data.normalize(images.float() / 255))
    assert torch.allclose(logits, direct, atol=1e-4)
    eager = class_logits(model, model, data.eval_batches(images, 32, batch_size=4))
    assert torch.allclose(eager, logits, atol=1e-4)  # the last batch not padded: the same
    model.train()
    class_logits(model, model, data.eval_batches(images[:2], 32, batch_size=4))
    assert model.training  # the model's mode is given back
    assert class_logits(model, model, data.eval_batches(images[:0], 32)).shape == (0, 3)


def test_unwritable_or_full_run_folder_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    args = ["--data", "phantom", "--phantoms", "64", "--cache-dir", ""] + TINY
    with pytest.raises(SystemExit, match="cannot write the run folder"):
        setup(parse_args(args + ["--runs", str(blocker)]))
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 10**6}))
    with pytest.raises(SystemExit, match=r"1 MiB free; the run's checkpoints need about \d+"):
        setup(parse_args(args + ["--runs", str(tmp_path / "full"), "--name", "x"]))
    assert not os.path.exists(tmp_path / "full" / "x")


def test_a_diverging_phase_stops_and_restores_the_last_good_state(tmp_path, capsys):
    args = ["--data", "phantom", "--phantoms", "64", "--cache-dir", "", "--runs", str(tmp_path),
            "--name", "boom"]
    run = setup(parse_args(args + TINY))
    films = data.stage_films(run, 32)
    phase = Phase(0, "unfrozen", 32, 16, 3, MaxLR.parse("1e30"), False)
    train.start_phase(run, phase, None)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with MetricsLog(run) as log:  # an LR of 1e30 overflows at once
        train.fit(run, phase, [1e30] * 3, films, log)
    rows = run.history
    assert len(rows) == 1 and rows[0]["diverged_at_step"] >= 1  # stopped in epoch 1
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # back at the start of the epoch
    out = capsys.readouterr().out
    assert "the loss was not finite at step" in out and "head LR" in out
    logged = json.loads(open(tmp_path / "boom" / "metrics.jsonl").read())
    assert logged["diverged_lr"] > 0 and logged["diverged_at_step"] == rows[0]["diverged_at_step"]


def test_each_phase_starts_with_the_optimizer_fastai_would_have(tmp_path, monkeypatch):
    args = ["--data", "phantom", "--phantoms", "64", "--cache-dir", "", "--runs", str(tmp_path)]
    seen = []  # (moments held, beta1) when each LR finder starts
    real_lr_find = lrfind.lr_find

    def spy(step, model, opt, *a, **k):
        seen.append((len(opt.state), opt.param_groups[0]["betas"][0]))
        return real_lr_find(step, model, opt, *a, **k)
    monkeypatch.setattr(lrfind, "lr_find", spy)
    head = Phase(0, "frozen", 32, 16, 1, MaxLR.parse("1e-3"), False)
    body = Phase(0, "unfrozen", 32, 16, 1, MaxLR.parse("auto"), False)
    again = Phase(1, "unfrozen", 32, 16, 1, MaxLR.parse("auto"), False)  # as paper's stage 3
    for reset, expect in [("fresh", "v1"), ("moments", "v2"), ("none", "kept"),
                          ("on-change", "v1")]:
        run = setup(parse_args(args + TINY + ["--opt-reset", reset, "--name", reset]))
        films = data.stage_films(run, 32)
        train.start_phase(run, head, None)
        with MetricsLog(run) as log:
            train.fit(run, head, [1e-3] * 3, films, log)
        moments = {id(p): s["exp_avg"].clone() for p, s in run.opt.state.items()}
        beta1 = run.opt.param_groups[0]["betas"][0]
        assert moments and beta1 != 0.9  # the one-cycle moved beta1
        seen.clear()
        train.start_phase(run, body, head)
        train.max_lrs(run, films, body)
        if expect == "v1":  # a new Adam: no moments, beta1 back to 0.9
            assert seen == [(0, 0.9)] and run.opt.param_groups[0]["betas"] == (0.9, 0.99)
        elif expect == "v2":  # clear_state: no moments, beta1 where the schedule left it
            assert seen == [(0, beta1)]
        else:  # one optimizer for the run
            assert seen == [(len(moments), beta1)]
            assert all(torch.equal(s["exp_avg"], moments[id(p)])
                       for p, s in run.opt.state.items())  # the finder put them back
        assert not any(p.requires_grad is False for p in run.model.body.parameters())
        if reset in ("fresh", "on-change"):  # an unfrozen phase after an unfrozen one
            with MetricsLog(run) as log:
                train.fit(run, body, [1e-3] * 3, films, log)
            opt = run.opt
            steps = {id(p): s["step"].item() for p, s in opt.state.items()}
            train.start_phase(run, again, body)
            if reset == "fresh":  # a new Adam at every phase
                assert run.opt is not opt and not run.opt.state
            else:  # fastai v1's fit without freeze()/unfreeze(): learn.opt goes on
                assert run.opt is opt and steps == {
                    id(p): s["step"].item() for p, s in run.opt.state.items()}


def test_recipes_set_their_knobs_and_flags_still_win():
    base = ["--data", "phantom"]
    paper = parse_args(base)
    assert (paper.recipe, paper.one_cycle, paper.pct_start, paper.div_final, paper.opt_reset,
            paper.suggest, paper.resize, paper.flip) == \
        ("paper", "v1", 0.3, 2.5e5, "fresh", "valley", "crop", True)
    v1 = parse_args(base + ["--recipe", "fastai-v1"])
    assert v1.suggest == "min_grad" and v1.one_cycle == "v1" and v1.opt_reset == "fresh"
    assert v1.precision == "fp32" and paper.precision == "auto"  # fastai v1 trained in fp32
    v2 = parse_args(base + ["--recipe", "fastai-v2"])
    assert (v2.one_cycle, v2.pct_start, v2.div_final, v2.opt_reset, v2.suggest) == \
        ("torch", 0.25, 1e5, "moments", "valley")
    mixed = parse_args(base + ["--recipe", "fastai-v2", "--pct-start", "0.3", "--demo"])
    assert mixed.pct_start == 0.3 and mixed.one_cycle == "torch" and mixed.arch == "resnet18"
    assert parse_args(base + ["--no-flip", "--resize", "squish"]).flip is False
    # fastai v1: final_div = div * 1e4 unless given; --div alone moves the final LR
    assert parse_args(base + ["--div", "10"]).div_final == 1e5
    assert parse_args(base + ["--div", "10", "--div-final", "3e5"]).div_final == 3e5
    assert parse_args(base + ["--recipe", "fastai-v2", "--div", "10"]).div_final == 1e5


def test_optimizer_is_fastai_v1s_adam_with_true_weight_decay(tmp_path):
    # fastai v1: opt_func = partial(optim.Adam, betas=(0.9, 0.99)), wd 1e-2 applied as
    # p *= 1 - lr * wd to every parameter that has a gradient, BatchNorm included (true_wd, bn_wd)
    args = ["--data", "phantom", "--phantoms", "64", "--cache-dir", "", "--runs", str(tmp_path)]
    run = setup(parse_args(args + TINY))
    assert isinstance(run.opt, torch.optim.AdamW)
    assert [g["name"] for g in run.opt.param_groups] == ["stem-layer2", "layer3-layer4", "head"]
    for g in run.opt.param_groups:
        assert g["betas"] == (0.9, 0.99) and g["weight_decay"] == 0.01 and g["eps"] == 1e-8
    p = run.model.head[1].weight  # a BatchNorm weight: decayed too
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    for g in run.opt.param_groups:
        g["lr"] = 0.1
    run.opt.step()
    assert torch.allclose(p.detach(), before * (1 - 0.1 * 0.01))


def test_the_step_minimises_cross_entropy(tmp_path):
    # fastai v1's classification loss: CrossEntropyFlat (layers.py), i.e. F.cross_entropy
    args = ["--data", "phantom", "--phantoms", "64", "--cache-dir", "", "--runs", str(tmp_path)]
    run = setup(parse_args(args + TINY))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    run.model.eval()  # dropout off, BatchNorm fixed: the same logits before the step
    with torch.no_grad():
        expect = torch.nn.functional.cross_entropy(run.model(x), y)
    before = run.model.head[-1].weight.detach().clone()
    loss = train_step(run.model, run.opt, x, y)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5) and not loss.requires_grad
    assert not torch.equal(run.model.head[-1].weight, before)  # and the optimizer stepped


def test_a_last_stage_without_epochs_still_sets_the_test_size(tmp_path, capsys, monkeypatch):
    sizes, real = [], data.stage_films

    def stage_films(run, size):
        sizes.append(size)
        return real(run, size)
    monkeypatch.setattr(data, "stage_films", stage_films)
    cfg = parse_args(["--data", "phantom", "--phantoms", "48", "--runs", str(tmp_path),
                      "--name", "z", "--cache-dir", "", "--stages", "32,40", "--frozen-epochs",
                      "0", "--unfrozen-epochs", "1,0", "--lr-unfrozen", "1e-3", "--batch-size",
                      "16", *TINY[:6]])
    train.main(cfg)
    assert sizes == [32, 40]  # the test split's films at 40 px, not 32 px ones resampled
    assert "== test split (40 images, 40 px)" in capsys.readouterr().out
    assert torch.load(tmp_path / "z" / "model.pt", weights_only=True)["size"] == 40


def test_save_best_keeps_the_epoch_of_the_lowest_validation_loss(tmp_path):
    train.main(parse_args(["--data", "phantom", "--phantoms", "96", "--arch", "resnet18",
                           "--weights", "none", "--device", "cpu", "--stages", "32,40",
                           "--frozen-epochs", "0", "--unfrozen-epochs", "2", "--batch-size",
                           "16", "--lr-unfrozen", "1e-3", "--cache-dir", "", "--save-best",
                           "--runs", str(tmp_path), "--name", "b"]))
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    k = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    assert best["val_loss"] == rows[k]["val_loss"] and best["epoch"] == k + 1
    assert best["size"] == (32 if k < 2 else 40) and set(best["model"]) == set(
        torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"])


def test_weights_that_cannot_be_had_stop_the_run_before_any_decoding(tmp_path, monkeypatch):
    from machinery import run as run_module
    decoded = []
    monkeypatch.setattr(run_module, "read_data", lambda *a: decoded.append(a))
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 a download cut short")
    args = [a if a != "none" else str(tmp_path / "cut.pth") for a in TINY]
    with pytest.raises(SystemExit, match="not a state dict torch.load can read"):
        setup(parse_args(["--data", SAMPLE, "--runs", str(tmp_path / "runs")] + args))
    assert not decoded and not os.path.exists(tmp_path / "runs")  # nothing read, no run


def count_host_reads(monkeypatch):
    """(reads, mode): every read of a tensor's value outside devices.HostCopy, while `mode` is
    entered. On a GPU each such read waits for everything queued: the device runs dry."""
    reads, inside = [], [0]
    for name in ("tolist", "cpu", "numpy"):
        def counted(self, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            if not inside[0]:
                reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_value = devices.HostCopy.value

    def value(self):  # a copy made without waiting, its own event waited for: no stall
        inside[0] += 1
        try:
            return real_value(self)
        finally:
            inside[0] -= 1
    monkeypatch.setattr(devices.HostCopy, "value", value)

    class Items(TorchDispatchMode):  # .item(), float(), int(), bool(), if tensor: ...
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and not inside[0]:
                reads.append("item")
            return func(*args, **(kwargs or {}))
    return reads, Items


def test_an_epoch_and_an_lr_sweep_read_the_device_a_fixed_few_times(tmp_path, monkeypatch):
    # per epoch: the divergence check, the loss, validation and steps.csv; never per step (the
    # progress bar reads copies made without waiting); the LR finder reads its losses so too
    run = setup(parse_args(["--data", "phantom", "--phantoms", "64", "--cache-dir", "",
                            "--runs", str(tmp_path)] + TINY))
    films = data.stage_films(run, 32)  # 25 steps of 2 films, then 12 of 4
    reads, Items = count_host_reads(monkeypatch)
    per_epoch, per_sweep = [], []
    for bs in (2, 4):  # twice the steps
        phase = Phase(0, "unfrozen", 32, bs, 1, MaxLR.parse("1e-3"), False)
        train.start_phase(run, phase, None)
        reads.clear()
        with MetricsLog(run) as log, Items():
            train.fit(run, phase, [1e-3] * 3, films, log)
        per_epoch.append(len(reads))
        run.cfg.lr_find_steps = 24 // bs
        reads.clear()
        with Items():
            lrfind.suggest_lr(run, films["train"], 32, bs, phase.tag)
        per_sweep.append(len(reads))
    assert per_epoch[0] == per_epoch[1] <= 6 and per_sweep == [0, 0], (per_epoch, per_sweep)


def test_evaluation_takes_the_training_batch_shape_padded(tmp_path, monkeypatch):
    # one shape a stage: cuDNN tunes (and a compiled model compiles) for it once
    run = setup(parse_args(["--data", "phantom", "--phantoms", "64", "--cache-dir", "",
                            "--runs", str(tmp_path)] + TINY))
    films = data.stage_films(run, 32)
    shapes, forward = [], run.infer
    run.infer = lambda x: shapes.append(tuple(x.shape)) or forward(x)
    loss, acc, probs = train.evaluate(run, films["test"], 32, 6)
    n = len(films["test"][1])
    assert n % 6 and shapes == [(6, 3, 32, 32)] * -(-n // 6)  # the last batch padded too
    run.infer = forward  # the same numbers as unpadded batches of another size
    loss_b, acc_b, probs_b = train.evaluate(run, films["test"], 32, 256)
    assert acc == acc_b and abs(loss - loss_b) < 1e-5 and torch.allclose(probs, probs_b, atol=1e-5)
