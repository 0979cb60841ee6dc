"""ablate.py: the variant table, skip/resume/failure handling, and a tiny ablation end to end."""
import json
import os

import pytest

import ablate

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cxr-sample")
SMALL = ["--arch", "resnet18", "--weights", "none", "--device", "cpu", "--stages", "32",
         "--frozen-epochs", "1", "--unfrozen-epochs", "1", "--batch-size", "16",
         "--lr-find-steps", "4", "--lr-find-start", "1e-4", "--lr-find-end", "1"]


def test_variants_are_flags_with_placeholders_from_the_base_run(tmp_path):
    base = ["--data", "phantom", "--stages", "32,48,64"]
    runs, variants, out, ref = ablate.parse(base + ["--seeds", "0,1", "--out", str(tmp_path),
                                                    "--variant", 'wd0=--wd 0 --no-flip'])
    assert list(variants) == ["paper", "no-progressive", "no-lrfind", "no-discriminative",
                              "no-freeze", "wd0"] and ref == "paper"
    assert len(runs) == 12 and runs[0]["dir"] == os.path.join(str(tmp_path), "paper-s0")
    assert [(r["variant"], r["seed"]) for r in runs[5:7]] == [("wd0", 0), ("paper", 1)]
    by = {(r["variant"], r["seed"]): r["args"] for r in runs}
    assert by["paper", 1] == base + ["--seed", "1", "--runs", str(tmp_path), "--name",
                                     "paper-s1"]
    assert by["no-progressive", 0][4:6] == ["--stages", "64,64,64"]  # after the base flags
    assert by["no-lrfind", 0][4:8] == ["--lr-frozen", ":3e-3,:3e-3,:3e-3", "--lr-unfrozen",
                                       ":3e-3,:3e-3,1e-6:1e-4"]  # fastai's slice; explicit kept
    assert by["no-freeze", 0][4:8] == ["--frozen-epochs", "0", "--unfrozen-epochs",
                                       "8,8,25"]  # the head-only epochs train all layers
    assert by["wd0", 0][4:7] == ["--wd", "0", "--no-flip"]
    runs, variants, _, _ = ablate.parse(base + ["--variants", "no-freeze", "--variant",
                                                "no-freeze=--frozen-epochs 0,0,0"])
    assert variants == {"no-freeze": "--frozen-epochs 0,0,0"} and len(runs) == 3


@pytest.mark.parametrize("flags, said", [
    (["--variants", "paper,nope"], "unknown variant(s) nope"),
    (["--variant", "broken"], 'give NAME="--flag value ..."'),
    (["--seeds", "a"], "--seeds a: give integers"),
    (["--seed", "3"], "--seed, --name, --runs and --resume are set by ablate.py"),
    (["--resume=runs/x"], "--seed, --name, --runs and --resume are set by ablate.py"),
    (["--variants", "paper,paper"], "a variant named twice"),
    (["--seeds", "0,0"], "a seed given twice"),
    (["--ref", "nope"], "--ref nope: not among the variants"),
    (["--preset", "shortcut", "--variants", "paper"], "--preset shortcut --variants paper: "
                                                      "give one"),
    (["--variant", "big=--batch-size 0"], "--batch-size 0 in '0': give batch sizes"),
    (["--variant", "x=--stages {nope}"], "has an unknown placeholder"),
])
def test_bad_variants_and_flags_stop_before_any_run(tmp_path, capsys, flags, said):
    with pytest.raises(SystemExit):
        ablate.parse(["--data", "phantom", "--out", str(tmp_path), *flags])
    assert said in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_finished_runs_are_skipped_killed_ones_resumed_started_ones_redone(tmp_path,
                                                                           monkeypatch):
    calls = []

    class Done:
        returncode = 0
    def fake_train(cmd, **k):  # "trains": writes what a finished run has
        calls.append(cmd)
        os.makedirs(r["dir"], exist_ok=True)
        for f in ("test_metrics.json", "test_predictions.csv"):
            open(os.path.join(r["dir"], f), "w").close()
        return Done
    monkeypatch.setattr(ablate.subprocess, "run", fake_train)
    r = {"dir": str(tmp_path / "v-s0"), "args": ["--data", "phantom"]}
    assert ablate.state(r["dir"]) == "new"
    assert ablate.run_one(r, str(tmp_path))[0] == "done" and calls[-1][2:] == r["args"]
    assert ablate.state(r["dir"]) == "done"
    for f in ("test_metrics.json", "test_predictions.csv"):
        os.remove(os.path.join(r["dir"], f))
    open(os.path.join(r["dir"], "config.json"), "w").close()  # died before its first epoch
    assert ablate.state(r["dir"]) == "started"
    ablate.run_one(r, str(tmp_path))
    assert calls[-1][-1] == "--overwrite"
    os.remove(os.path.join(r["dir"], "test_predictions.csv"))  # killed before its last file
    open(os.path.join(r["dir"], "last.pt"), "w").close()
    assert ablate.state(r["dir"]) == "killed"
    assert ablate.run_one(r, str(tmp_path))[0] == "resumed"
    assert calls[-1][2:] == ["--resume", r["dir"]]
    n = len(calls)
    assert ablate.run_one(r, str(tmp_path))[0] == "skipped (done before)" and len(calls) == n


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/data/cxr-sample absent")
def test_the_shortcut_preset_end_to_end_on_the_sample(tmp_path, capsys):
    """--preset shortcut (whole films, lungs hidden, lungs alone) x 2 seeds on real films, and
    one variant that fails: reported, the rest go on, compared paired and against chance; a
    rerun trains nothing again; other flags in the same folder are refused."""
    out = str(tmp_path / "abl")
    args = ["--data", SAMPLE, *SMALL, "--cache-dir", str(tmp_path / "cache"),
            "--preset", "shortcut", "--variant", "huge=--batch-size 4096", "--seeds", "0,1",
            "--out", out]
    with pytest.raises(SystemExit) as e:  # exit status 1: not every run ran
        ablate.main(args)
    assert e.value.code == 1
    said = capsys.readouterr().out
    assert "[1/8] whole-films seed 0: done, test accuracy" in said
    assert "[4/8] huge seed 0: failed (exit 1)" in said and "fewer than one batch" in said
    assert "2 run(s) failed: huge-s0, huge-s1" in said
    rows = json.load(open(os.path.join(out, "compare.json")))  # written all the same
    groups = ["whole-films", "lungs-hidden", "lungs-alone"]  # the failed variant left out
    assert [r["group"] for r in rows] == groups
    assert all(r["accuracy"]["n"] == 2 and r["chance"]["always"] == "normal" for r in rows)
    assert all("welch_lo" in r["vs_ref"] and r["vs_ref"]["ref"] == "whole-films"
               for r in rows[1:])
    assert "| chance: always normal | | 40.4 | | 33.3 |" in open(os.path.join(
        out, "compare.md")).read()  # 19 of the 47 test films; 3 classes
    for g, hide in zip(groups, ["none", "lungs", "outside"]):
        cfg = json.load(open(os.path.join(out, f"{g}-s1", "config.json")))
        assert cfg["hide"] == hide and cfg["seed"] == 1
    report = open(os.path.join(out, "lungs-hidden-s0", "report.md")).read()
    assert "films with the lungs hidden (the central 75% x 75%" in report
    assert "a shortcut test, not a classifier" in report
    record = json.load(open(os.path.join(out, "ablation.json")))
    assert record["variants"]["lungs-alone"] == "--hide outside"
    # again, without the failing variant: the finished runs are skipped (a failed run is a
    # started one, which a rerun redoes: the test above)
    ablate.main([a for a in args if a not in ("--variant", "huge=--batch-size 4096")])
    said = capsys.readouterr().out
    assert said.count("skipped (done before)") == 6 and "huge" not in said
    with pytest.raises(SystemExit, match="holds runs made with other flags"):
        ablate.main(args[:-2] + ["--wd", "0", "--out", out])  # never mixed with other flags


def test_a_folder_holding_an_lr_finders_run_is_reported_not_a_crash(tmp_path, capsys):
    """lrfind.py's folder where a run would go: never written over; said as a failed run (it
    has no log to quote), and the ablation ends saying nothing finished."""
    out = tmp_path / "abl"
    for seed in (0, 1):
        (out / f"paper-s{seed}").mkdir(parents=True)
        (out / f"paper-s{seed}" / "lrfind.json").write_text("{}")
    with pytest.raises(SystemExit, match="no finished runs"):
        ablate.main(["--data", "phantom", *SMALL, "--variants", "paper", "--seeds", "0,1",
                     "--out", str(out)])
    said = capsys.readouterr().out
    assert f"[1/2] paper seed 0: failed ({out}/paper-s0 holds an LR finder's folder" in said
    assert "2 run(s) failed: paper-s0, paper-s1" in said
