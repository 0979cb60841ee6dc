"""Flags checked before any work (one message per flag, no traceback), and run folders that are
never written over."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from machinery import datasets
from machinery.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--data", "phantom"]


def errors(capsys, *flags):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + list(flags))
    assert e.value.code == 2  # argparse's usage error, not a crash
    return capsys.readouterr().err


@pytest.mark.parametrize("flags, said", [
    (["--stages", "abc"], "--stages 'abc' is not a comma list of image sizes"),
    (["--stages", "0"], "--stages 0 in '0': give image sizes of at least 8 px"),
    (["--batch-size", "0"], "--batch-size 0 in '0': give batch sizes (1 or more)"),
    (["--frozen-epochs", "-1"], "--frozen-epochs -1 in '-1': give epoch counts"),
    (["--lr-unfrozen", "fast"], "--lr-unfrozen 'fast' is not a comma list of auto, an LR"),
    (["--lr-frozen", "1e-3:1e-5"], "--lr-frozen '1e-3:1e-5' is not a comma list of auto"),
    (["--stages", "128,224", "--unfrozen-epochs", "1,2,3"],
     "--unfrozen-epochs has 3 values for 2 stages (128,224)"),
    (["--val-frac", "1.0"], "--val-frac 1.0: give a fraction in [0, 1): what is left must train"),
    (["--pct-start", "0"], "--pct-start 0.0: give a fraction in (0, 1)"),
    (["--lr-find-end", "1e-8"], "--lr-find-end 1e-08 must be above --lr-find-start 1e-07"),
    (["--p-affine", "1.5"], "--p-affine 1.5: give a probability in [0, 1]"),
    (["--seed", "-1"], "--seed -1: give an integer in [0, 2**32)"),
    (["--cudnn-benchmark", "0"], "--cudnn-benchmark 0: give on, off or a number of algorithms"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    (["--train-split", "/no/such.txt"], "--train-split /no/such.txt: no such file"),
    (["--weights", "/no/such.pth"], "--weights /no/such.pth: give imagenet, none or a state"),
    (["--device", "gpu"], "--device gpu: give auto, cpu, cuda or cuda:N"),
    (["--name", "a/b"], "--name a/b: a folder name, without /"),
])
def test_each_kind_of_bad_flag_is_named_with_what_it_accepts(capsys, flags, said):
    assert said in errors(capsys, *flags)


def test_every_bad_flag_is_said_at_once_and_good_ones_pass(capsys):
    err = errors(capsys, "--batch-size", "0", "--val-frac", "2", "--stages", "0")
    assert "3 flag(s) to fix" in err and "--batch-size" in err and "--val-frac" in err
    cfg = parse_args(BASE + ["--stages", "128,224", "--lr-unfrozen", "auto,1e-6:1e-4",
                             "--batch-size", "64,32", "--val-frac", "0"])
    assert cfg.stages == "128,224"


def test_the_command_line_ends_with_the_message_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", "phantom",
                        "--batch-size", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--batch-size 0" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "runs")  # no work done, no folder made


def test_a_split_file_that_is_not_utf8_is_a_data_error_naming_the_line(tmp_path):
    for split in ("train", "test"):
        os.makedirs(tmp_path / split)
    (tmp_path / "train.txt").write_bytes(b"p1 a.png normal\np2 b\xff.png COVID-19\n")
    (tmp_path / "test.txt").write_bytes(b"p3 c.png normal\n")
    with pytest.raises(datasets.DataError, match=r"train.txt line 2: not UTF-8 text \(byte 0xff "
                                             r"at column 5\)"):
        datasets.load_dataset(str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data",
                        str(tmp_path), "--weights", "none", "--runs", str(tmp_path / "runs")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


TINY = ["--data", "phantom", "--phantoms", "40", "--arch", "resnet18", "--weights", "none",
        "--device", "cpu", "--stages", "32", "--frozen-epochs", "0", "--unfrozen-epochs", "1",
        "--batch-size", "16", "--lr-unfrozen", "1e-3", "--cache-dir", ""]


def test_a_run_folder_that_holds_a_run_is_never_written_over(tmp_path, capsys):
    import train

    def run(*flags):  # as `python train.py ...` runs it, in this process
        return train.main(parse_args([*TINY, "--runs", str(tmp_path), "--name", "same",
                                      *flags]))
    run()
    model = tmp_path / "same" / "model.pt"
    first = model.read_bytes()
    assert not (tmp_path / "same" / "last.pt").exists()  # a finished run keeps no last.pt
    with pytest.raises(SystemExit, match="that run finished .*--keep-last"):
        train.main(parse_args(["--resume", str(tmp_path / "same")]))
    with pytest.raises(SystemExit, match="already holds a run") as e:
        run("--seed", "1")
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert model.read_bytes() == first  # untouched
    run("--seed", "1", "--overwrite", "--keep-last")
    assert model.read_bytes() != first  # replaced, as asked
    assert (tmp_path / "same" / "last.pt").exists()  # kept, as asked
    from machinery.checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError, match=r"last.pt: the training state a finished run kept "
                       r"\(--keep-last\), not its model: that is .*same/model.pt"):
        load_checkpoint(str(tmp_path / "same" / "last.pt"))  # not "unfinished": it is not
    train.main(parse_args(["--resume", str(tmp_path / "same")]))  # into its own folder


def test_defaults_follow_the_stages_given_and_resume_takes_nothing_else(capsys):
    from machinery.config import make_stages
    st = make_stages(parse_args(["--demo", "--stages", "32,48"]))  # the demo's lists, cut
    assert [(s.size, s.frozen_epochs, s.unfrozen_epochs) for s in st] == [(32, 1, 3), (48, 1, 3)]
    assert "--unfrozen-epochs has 3 values for 4 stages" in errors(
        capsys, "--stages", "32,48,64,96")  # a default shorter than the stages is not guessed
    assert "nothing to train" in errors(capsys, "--frozen-epochs", "0", "--unfrozen-epochs", "0")
    from machinery.config import Config  # made in code (bench.py's): cut, or said by flag
    assert [s.size for s in make_stages(Config(stages="64,96"))] == [64, 96]
    with pytest.raises(SystemExit, match=r"--frozen-epochs has 3 values for 4 stages"):
        make_stages(Config(stages="32,48,64,96"))
    with pytest.raises(SystemExit):
        parse_args(["--resume", "runs/x", "--batch-size", "0"])
    assert "--resume goes on with the run's saved config" in capsys.readouterr().err
    assert parse_args(["--resume", "runs/x"]).resume == "runs/x"


def test_overwrite_removes_only_a_run_folder(tmp_path):
    from machinery.run import setup
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    cfg = parse_args(TINY + ["--runs", str(tmp_path), "--name", "notes", "--overwrite"])
    setup(cfg)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"  # not a run: left as is


def test_help_says_each_default_once_and_never_an_empty_one():
    import evaluate
    from machinery.config import make_parser
    for text in (make_parser().format_help(), evaluate.make_parser().format_help()):
        flat = " ".join(text.split())
        assert "(default: )" not in flat and "(default: 0) (default" not in flat
        assert flat.count("(default:") >= 10 and "--seed" in flat
    assert "random seed (default: 0)" in " ".join(make_parser().format_help().split())
    assert "--no-demo" not in make_parser().format_help()  # a twin that means nothing, hidden


def test_a_run_relaunched_from_its_config_with_one_change(tmp_path):
    saved = dataclasses.asdict(parse_args(BASE + ["--stages", "64,96", "--wd", "0.05",
                                                  "--name", "first", "--device", "cpu"]))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**saved, "git_commit": "abc", "torch": "2.14"}))
    cfg = parse_args(["--config", str(path), "--seed", "7"])
    again = dataclasses.asdict(cfg)
    assert cfg.seed == 7 and cfg.wd == 0.05 and cfg.stages == "64,96"  # the change, the rest
    assert cfg.name == "" and cfg.device == "auto"  # a new run, on this machine
    assert {k for k in saved if saved[k] != again[k]} == {"seed", "name", "device", "config"}
    assert parse_args(["--config", str(path), "--wd", "0"]).wd == 0  # flags given still win
    # --div moves the final LR as it does on the command line (config.json saved 2.5e5)...
    assert saved["div_final"] == 2.5e5 and cfg.div_final == 2.5e5
    assert parse_args(["--config", str(path), "--div", "10"]).div_final == 1e5
    chosen = tmp_path / "chosen.json"  # ...but a div_final that was chosen stays
    chosen.write_text(json.dumps({**saved, "div_final": 1e5}))
    assert parse_args(["--config", str(chosen), "--div", "10"]).div_final == 1e5
    assert parse_args(["--config", str(chosen)]).div_final == 1e5
    with pytest.raises(SystemExit):
        parse_args(["--config", str(tmp_path / "none.json")])


def test_a_config_written_by_hand_is_checked_like_the_flags(tmp_path, capsys):
    """JSON numbers and lists where the flag takes text; every wrong key or value named at
    once, with the closest knob; exit status 2, before anything is made."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"batch_size": 16, "stages": [64, 96], "wd": 0.05, "seed": 3,
                                "lr_unfrozen": ["auto", "1e-6:1e-4"], "flip": False,
                                "git_commit": "abc"}))  # what a run's config.json adds
    cfg = parse_args(BASE + ["--config", str(path)])
    assert (cfg.batch_size, cfg.stages, cfg.lr_unfrozen) == ("16", "64,96", "auto,1e-6:1e-4")
    assert (cfg.wd, cfg.seed, cfg.flip) == (0.05, 3, False)
    path.write_text(json.dumps({"unfrozen_epoch": "3", "wd": "abc", "flip": "no", "seed": 1.5,
                                "stages": {"a": 1}}))
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + ["--config", str(path), "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "5 value(s) to fix" in err
    for said in ("'unfrozen_epoch': not a knob (did you mean 'unfrozen_epochs'?)",
                 "'wd': 'abc' is not a number", "'flip': 'no' is not true or false",
                 "'seed': 1.5 is not an integer", "'stages': {'a': 1} is not text, a number"):
        assert said in err
    path.write_text(json.dumps({"batch_size": 0}))  # then the flags' own checks
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--config", str(path)])
    assert "--batch-size 0 in '0': give batch sizes" in capsys.readouterr().err
    path.write_text("[16, 32]")
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--config", str(path)])
    assert "a JSON list, not an object of knobs" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


def test_the_recipe_is_one_value_that_the_flags_and_variants_derive_from():
    """schedule.PAPER is the only place the paper's numbers are written: the flags' defaults,
    --recipe's variants, augmentation's and the schedules' defaults all follow it. Changed in
    a fresh interpreter, everything moves with it."""
    probe = """if True:
        import dataclasses, json, schedule
        P = schedule.PAPER
        schedule.PAPER = dataclasses.replace(P, stages=(
            schedule.Stage(96, 2, 4, 16), schedule.Stage(160, 0, 6, 8, lr_unfrozen="1e-5:1e-3")),
            pct_start=0.4, rotate=5.0, lr_find_steps=50, wd=0.1)
        from machinery.config import parse_args
        import data
        cfg = parse_args(["--data", "phantom"])
        v2 = parse_args(["--data", "phantom", "--recipe", "fastai-v2"])
        print(json.dumps([cfg.stages, cfg.frozen_epochs, cfg.unfrozen_epochs, cfg.batch_size,
                          cfg.lr_unfrozen, cfg.pct_start, cfg.rotate, cfg.lr_find_steps, cfg.wd,
                          v2.pct_start, v2.one_cycle, data.Augment().rotate]))"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["96,160", "2,0", "4,6", "16,8", "auto,1e-5:1e-3", 0.4,
                                      5.0, 50, 0.1, 0.25, "torch", 5.0]


def test_the_flags_default_to_the_papers_recipe():
    from schedule import FASTAI_V2, PAPER, one_cycle, one_cycle_torch
    from machinery.config import RECIPES, as_knobs, changes
    cfg = parse_args(["--data", "phantom"])
    assert {k: getattr(cfg, k) for k in as_knobs(PAPER) if k != "div_final"} == {
        "stages": "128,224,229", "frozen_epochs": "3,3,0", "unfrozen_epochs": "5,5,25",
        "batch_size": "64", "lr_frozen": "auto", "lr_unfrozen": "auto,auto,1e-6:1e-4",
        "one_cycle": "v1", "pct_start": 0.3, "div": 25.0, "wd": 0.01, "opt_reset": "fresh",
        "lr_find_steps": 100, "lr_find_start": 1e-7, "lr_find_end": 10.0, "lr_find_beta": 0.98,
        "suggest": "valley", "flip": True, "rotate": 10.0, "zoom": 1.1, "warp": 0.2,
        "lighting": 0.2, "p_affine": 0.75, "p_lighting": 0.75}
    assert cfg.div_final == 25.0 * 1e4  # fastai v1's final_div, derived from --div
    assert RECIPES["fastai-v2"] == changes(FASTAI_V2) == dict(
        one_cycle="torch", pct_start=0.25, div_final=1e5, opt_reset="moments")
    # the schedules' own defaults are the recipes': v1's from PAPER, torch's from fastai v2
    assert one_cycle(0, 10, 1.0) == one_cycle(0, 10, 1.0, 0.3, 25.0, 2.5e5)
    assert one_cycle_torch(3, 10, 1.0) == one_cycle_torch(3, 10, 1.0, 0.25, 25.0, 1e5)


def test_split_files_are_named_in_data_as_they_are_read(tmp_path, capsys):
    """--train-split NAME is read from --data (datasets.load_dataset); the flags' check looks
    there too, not in the current folder."""
    (tmp_path / "train_split.txt").write_text("")
    cfg = parse_args(["--data", str(tmp_path), "--train-split", "train_split.txt"])
    assert cfg.train_split == "train_split.txt"
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--test-split", "test_split.txt"])
    assert f"--test-split {tmp_path}/test_split.txt: no such file" in capsys.readouterr().err
