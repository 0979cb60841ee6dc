"""compare.py on synthetic run folders whose predictions are known."""
import csv
import json
import math
import statistics

import pytest

import compare

CLASSES = ["COVID-19", "normal"]
N = 200


def write_run(folder, correct, wd=0.01, seed=0, labels=None, classes=CLASSES, files=None):
    """A finished run folder: config, test metrics and predictions; correct[i] says whether
    image i was predicted right."""
    folder.mkdir(parents=True)
    labels = labels or [CLASSES[i % 2] for i in range(N)]
    files = files or [f"test/img{i:03d}.png" for i in range(N)]
    preds = [y if ok else classes[1 - classes.index(y)] for y, ok in zip(labels, correct)]
    acc = sum(correct) / N
    sens = {c: sum(ok for y, ok in zip(labels, correct) if y == c) / labels.count(c)
            for c in classes}
    json.dump({"arch": "resnet18", "wd": wd, "seed": seed, "name": folder.name},
              open(folder / "config.json", "w"))
    json.dump({"accuracy": {"value": acc}, "balanced_accuracy": sum(sens.values()) / 2,
               "macro_f1": acc, "classes": classes, "timings_s": {"total": 10.0 + seed},
               "per_class": {c: {"sensitivity": {"value": v}} for c, v in sens.items()}},
              open(folder / "test_metrics.json", "w"))
    with open(folder / "test_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "source", "label", "predicted"])
        for i in range(N):
            w.writerow([files[i], f"p{i}", "s", labels[i], preds[i]])
    return str(folder)


def runs_of(tmp_path, name, n_right, wd, seeds=(0, 1, 2)):
    """One run per seed, the first n_right[k] images right in seed k's run."""
    return [write_run(tmp_path / f"{name}-s{s}", [i < n for i in range(N)], wd, s)
            for s, n in zip(seeds, n_right)]


def test_groups_by_what_differs_with_means_sds_and_t_intervals(tmp_path):
    a = runs_of(tmp_path, "a", [150, 160, 170], 0.01)
    b = runs_of(tmp_path, "b", [120, 130, 110], 0.0)
    groups = compare.group_runs([compare.load_run(r) for r in a + b])
    assert list(groups) == ["wd=0.01", "wd=0.0"]  # seed and name are not a difference
    rows = compare.compare(groups)
    accs = [0.75, 0.80, 0.85]
    s = rows[0]["accuracy"]
    assert s["n"] == 3 and s["mean"] == pytest.approx(statistics.mean(accs))
    assert s["sd"] == pytest.approx(statistics.stdev(accs))
    half = 4.303 * statistics.stdev(accs) / math.sqrt(3)  # t(0.975, 2 df)
    assert (s["lo"], s["hi"]) == pytest.approx((0.8 - half, 0.8 + half))
    assert rows[0]["wall_s"]["mean"] == pytest.approx(11.0)
    assert rows[1]["accuracy"]["mean"] == pytest.approx(0.6)
    assert compare.t975(60) == pytest.approx(2.0003, abs=2e-4)  # the series beyond the table


def test_paired_bootstrap_holds_the_known_difference(tmp_path):
    a = runs_of(tmp_path, "a", [150, 160, 170], 0.01)
    b = runs_of(tmp_path, "b", [120, 130, 110], 0.0)
    rows = compare.compare({"a": a, "b": b}, ref="a")
    v = rows[1]["vs_ref"]
    assert v["diff"] == pytest.approx(0.6 - 0.8)  # per image, averaged over seeds
    assert v["lo"] < -0.2 < v["hi"] and v["hi"] < 0  # excludes 0: 40 images differ always
    same = compare.compare({"a": a, "a2": a})
    assert (same[1]["vs_ref"]["lo"], same[1]["vs_ref"]["hi"]) == (0, 0)


def test_mcnemar_exact_for_two_single_runs(tmp_path):
    right_a = [i < 150 for i in range(N)]
    right_b = [i < 140 or 150 <= i < 152 for i in range(N)]  # b = 10, c = 2
    ra = write_run(tmp_path / "a", right_a)
    rb = write_run(tmp_path / "b", right_b, wd=0)
    rows = compare.compare({"a": [rb], "b": [ra]})
    m = rows[1]["vs_ref"]["mcnemar"]
    assert (m["b"], m["c"]) == (10, 2)
    assert m["p"] == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)  # 0.0386, by hand
    assert compare.mcnemar_exact(0, 0) == 1.0 and compare.mcnemar_exact(5, 5) == 1.0


def test_refuses_other_test_sets_and_class_lists(tmp_path):
    base = write_run(tmp_path / "base", [True] * N)
    other_files = write_run(tmp_path / "files", [True] * N,
                            files=[f"test/other{i:03d}.png" for i in range(N)])
    other_labels = write_run(tmp_path / "labels", [True] * N,
                             labels=[CLASSES[(i + 1) % 2] for i in range(N)])
    other_classes = write_run(tmp_path / "classes", [True] * N, classes=["normal", "COVID-19"])
    for other, said in [(other_files, "400 images are in one test set only"),
                        (other_labels, "the same images carry other labels"),
                        (other_classes, "other class lists cannot be compared")]:
        with pytest.raises(compare.CompareError, match=said):
            compare.compare({"a": [base], "b": [other]})
    with pytest.raises(SystemExit, match="not a finished run"):
        compare.main([base, str(tmp_path), "--strict"])
    with pytest.raises(SystemExit, match="no finished run among"):
        compare.main([str(tmp_path)])


def test_unfinished_folders_are_skipped_with_a_note(tmp_path, capsys):
    runs = runs_of(tmp_path, "a", [150, 160], 0.01) + runs_of(tmp_path, "b", [120, 130], 0.0)
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "config.json").write_text("{}")
    rows = compare.main([*runs, str(tmp_path / "killed"), "--out", str(tmp_path / "cmp")])
    assert len(rows) == 2  # the two groups, as without the killed folder
    assert f"skipped {tmp_path / 'killed'}: not a finished run" in capsys.readouterr().out


def test_the_command_line_writes_table_csv_and_plot(tmp_path, capsys):
    runs = runs_of(tmp_path, "a", [150, 160, 170], 0.01) + \
        runs_of(tmp_path, "b", [120, 130, 110], 0.0)
    out = tmp_path / "cmp"
    compare.main([*runs, "--out", str(out), "--ref", "wd=0.0"])
    md = (out / "compare.md").read_text()
    assert "| wd=0.01 | 3 | 80.0 ± 5.0 [" in md and "| wd=0.01 | +20.0 |" in md
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["group"] for r in rows] == ["wd=0.01", "wd=0.0"]
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(0.8)
    assert (out / "compare.png").stat().st_size > 1000
    assert "paired bootstrap" in capsys.readouterr().out
    compare.main([*runs, "--group-by", "arch", "--out", str(out)])  # one group of six
    assert "| arch=resnet18 | 6 |" in (out / "compare.md").read_text()


def test_welch_over_seeds_duplicates_once_ref_by_part_and_data_moved(tmp_path):
    a = runs_of(tmp_path, "a", [150, 160, 170], 0.01)
    b = runs_of(tmp_path, "b", [120, 130, 110], 0.0)
    rows = compare.report({"a": a + a[:1], "b": b}, str(tmp_path / "o"), ref="a")
    assert rows[0]["accuracy"]["n"] == 3  # a run given twice counts once
    v = rows[1]["vs_ref"]  # Welch: sd 0.05 both, df 4, t 2.776
    half = 2.776 * math.sqrt(2 * 0.05 ** 2 / 3)
    assert (v["welch_lo"], v["welch_hi"]) == pytest.approx((-0.2 - half, -0.2 + half))
    assert compare.compare({"wd=0.01": a, "wd=0.0": b}, ref="0.0")[0]["vs_ref"]["ref"] == \
        "wd=0.0"
    # the same images under another data root (moved, or given as another path) still match
    moved = write_run(tmp_path / "moved", [True] * N,
                      files=[f"/elsewhere/test/img{i:03d}.png" for i in range(N)])
    cfg = json.load(open(tmp_path / "moved" / "config.json"))
    json.dump({**cfg, "data": "/elsewhere"}, open(tmp_path / "moved" / "config.json", "w"))
    here = write_run(tmp_path / "here", [True] * N,
                     files=[f"/data/x/test/img{i:03d}.png" for i in range(N)])
    cfg = json.load(open(tmp_path / "here" / "config.json"))
    json.dump({**cfg, "data": "/data/x/"}, open(tmp_path / "here" / "config.json", "w"))
    assert compare.compare({"m": [moved], "h": [here]})[1]["vs_ref"]["diff"] == 0


def test_a_class_without_test_images_and_strict_json(tmp_path):
    r = write_run(tmp_path / "a", [True] * N)
    m = json.load(open(tmp_path / "a" / "test_metrics.json"))
    m["per_class"]["normal"]["sensitivity"]["value"] = None  # --allow-missing-class
    json.dump(m, open(tmp_path / "a" / "test_metrics.json", "w"))
    rows = compare.report({"a": [r]}, str(tmp_path / "o"))
    assert rows[0]["sensitivity_normal"]["n"] == 0
    json.loads((tmp_path / "o" / "compare.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in compare.json"))
