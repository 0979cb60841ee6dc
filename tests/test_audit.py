"""The data audit: the near-duplicate detector on real films and their copies, the check at
every training start, audit.py's findings and files, and the shortcut baseline."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import audit as audit_cli
from machinery import audit, datasets, films
from machinery.config import parse_args
from machinery.report import data_lines
from machinery.run import read_data

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cxr-sample")
pytestmark = pytest.mark.skipif(not os.path.isdir(SAMPLE),
                                reason="../shared/data/cxr-sample absent")


def sample_rows(split="train"):
    return [line.split() for line in open(os.path.join(SAMPLE, f"{split}.txt"))]


def thumbs_of(paths):
    items = datasets.Items(list(paths), [0] * len(paths), list(paths), [""] * len(paths))
    return audit.thumbs(films.load_pixels(items, [audit.THUMB]).images[audit.THUMB])


def test_copies_of_real_films_are_found_and_distinct_films_are_not(tmp_path):
    rows = sample_rows()
    one_each = list({r[0]: r for r in rows}.values())[::6][:14]  # 14 patients, one film each
    paths = [os.path.join(SAMPLE, "train", r[1]) for r in one_each]
    th = thumbs_of(paths)
    assert audit.near_duplicates(th) == []  # distinct patients: no pair
    rng = np.random.default_rng(0)
    for kind in ["resize 50%", "JPEG q50", "brighter", "16-bit PNG", "crop 2%"]:
        copies = []
        for k, p in enumerate(paths):
            img, fmt = audit_cli.copy_of(films.to_gray(Image.open(p)), kind, rng)
            copies.append(str(tmp_path / f"{kind[:4]}{k}.{'jpg' if fmt == 'JPEG50' else 'png'}"))
            img.save(copies[-1], **({"quality": 50} if fmt == "JPEG50" else {}))
        pairs = audit.near_duplicates(th, thumbs_of(copies))
        found = {(p.i, p.j) for p in pairs}
        assert sum((i, i) in found for i in range(len(paths))) >= len(paths) - (kind == "crop 2%")
        assert all(p.i == p.j for p in pairs), kind  # never a copy of another film


def test_pack_counts_bits_as_the_plain_comparison():
    bits = torch.rand(30, 63, generator=torch.Generator().manual_seed(0)) > 0.5
    h = audit.pack(bits)
    d = audit.POPCOUNT[(h[:, None] ^ h[None]).int()].sum(-1)
    assert torch.equal(d.long(), (bits[:, None] != bits[None]).sum(-1))


def small_covidx(tmp_path, test_extra=None):
    """A COVIDx folder of 12 train and 6 test films of cxr-sample; test_extra: (name, PIL
    image) added to test as a COVID-19 film of a new patient."""
    root = tmp_path / "data"
    for split, n in (("train", 4), ("test", 2)):
        (root / split).mkdir(parents=True)
        rows = [r for c in ("normal", "pneumonia", "COVID-19")
                for r in [r for r in sample_rows(split) if r[2] == c][:n]]
        for r in rows:
            shutil.copy(os.path.join(SAMPLE, split, r[1]), root / split / r[1])
        if split == "test" and test_extra:
            test_extra[1].save(root / "test" / test_extra[0])
            rows.append(["newpatient", test_extra[0], "COVID-19", "copy"])
        (root / f"{split}.txt").write_text("".join(" ".join(r) + "\n" for r in rows))
    return root


def test_training_refuses_a_test_film_copied_from_training(tmp_path):
    first = [r for r in sample_rows() if r[2] == "normal"][0]
    img = Image.open(os.path.join(SAMPLE, "train", first[1]))
    copy = img.resize((img.width * 3 // 4, img.height * 3 // 4))
    root = small_covidx(tmp_path, ("copy.png", copy))
    flags = ["--data", str(root), "--stages", "64", "--cache-dir", "", "--val-frac", "0"]
    with pytest.raises(datasets.DataError, match="(?s)1 test films have an exact or near "
                       "duplicate in training.*--allow-duplicates.*copy.png ~ .*" + first[1]):
        read_data(parse_args(flags), [64])
    *_, leaks = read_data(parse_args(flags + ["--allow-duplicates"]), [64])
    assert leaks["test_films_with_duplicate_in_train"] == 1 and leaks["allowed"]
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    with open(run_dir / "leaks.json", "w") as f:  # what the run's report.md then says
        json.dump(leaks, f)
    said = lambda: "\n".join(data_lines(str(run_dir / "leaks.json"), ["COVID-19", "normal",
                                                                     "pneumonia"],
                                         {"data": str(root)}, {"confusion_matrix": [[1]]}))
    assert "audit.md" not in said()
    audit_md = tmp_path / "runs" / f"audit-{root.name}" / "audit.md"  # audit.py's, by default
    audit_md.parent.mkdir()
    audit_md.write_text("# audit")
    said = said()
    assert f"[../audit-{root.name}/audit.md](../audit-{root.name}/audit.md)" in said
    assert "**1 test films have an exact or near duplicate in training**" in said
    assert "copy.png ~ " in said and first[1] in said
    assert "| copy | 1 | 0 | 0 |" in said  # the sources by class: the copy's own source
    # a validation film's copy in training: a warning and a count, not a stop
    root2 = small_covidx(tmp_path / "val")
    with open(root2 / "train.txt", "a") as f:
        f.write(f"copy-patient copy.png {first[2]} x\n")
    copy.save(root2 / "train" / "copy.png")
    flags2 = ["--data", str(root2)] + flags[2:6] + ["--val-frac", "0.5"]
    apart = 0
    for seed in range(6):  # the patient split falls differently with each seed
        _, items, _, leaks = read_data(parse_args(flags2 + ["--seed", str(seed)]), [64])
        where = {os.path.basename(p): k for k in ("train", "val") for p in items[k].paths}
        split = where["copy.png"] != where[first[1]]
        assert leaks["val_films_with_duplicate_in_train"] == split
        apart += split
    assert 0 < apart < 6
    clean = small_covidx(tmp_path / "clean")
    *_, leaks = read_data(parse_args(["--data", str(clean)] + flags[2:]), [64])
    assert leaks["test_films_with_duplicate_in_train"] == 0 and leaks["films"] == []


def test_audit_command_finds_duplicates_patients_sources(tmp_path):
    first = [r for r in sample_rows() if r[2] == "normal"][0]
    root = small_covidx(tmp_path)
    test_film = open(root / "test.txt").readline().split()
    # in train: the same file under a second name and patient, and a test film made smaller
    shutil.copy(root / "train" / first[1], root / "train" / "again.jpg")
    img = Image.open(root / "test" / test_film[1])
    img.resize((img.width // 2, img.height // 2)).save(root / "train" / "smaller.png")
    with open(root / "train.txt", "a") as f:
        f.write(f"other again.jpg normal {first[3]}\nother2 smaller.png {test_film[2]} x\n")
    out = tmp_path / "audit"
    (out).mkdir()
    (out / "duplicates.png").write_bytes(b"an earlier audit's")
    a = audit_cli.main(["--data", str(root), "--out", str(out), "--cache-dir", ""])
    pairs = {k: [(os.path.basename(p["a"]), os.path.basename(p["b"]), p["identical"],
                  p["same_bytes"]) for p in v] for k, v in a["duplicates"].items()}
    assert pairs == {"train~train": [(first[1], "again.jpg", True, True)], "test~test": [],
                     "test~train": [(test_film[1], "smaller.png", False, False)]}
    assert [p["patient_b"] for p in a["same_picture_two_patients"]] == ["other", "other2"]
    assert a["patients_in_both_splits"] == []
    want = {}
    for split in ("train", "test"):
        for pid, name, label, source in (line.split() for line in open(root / f"{split}.txt")):
            want.setdefault(source, dict.fromkeys(a["classes"], 0))[label] += 1
    assert a["sources"] == want
    assert 0 < a["shortcut"]["chance"] < 1 and "source=kermany" in a["shortcut"]["features"]
    for f in ("audit.md", "audit.json", "duplicates.png"):
        assert (out / f).is_file()
    assert json.load(open(out / "audit.json"))["films"] == {"train": 14, "test": 6}
    assert "again.jpg" in (out / "audit.md").read_text()
    assert (out / "duplicates.png").read_bytes()[:4] == b"\x89PNG"  # this audit's
    sheet = np.asarray(Image.open(out / "duplicates.png"))
    assert sheet.shape == (2 * 190, 328)  # two pairs, each row 160 px and two captions
    assert (sheet[176:190, :160] < 128).any()  # the file names below the films


def test_shortcut_baseline_sees_labels_that_follow_the_source():
    g = torch.Generator().manual_seed(0)
    n = 120
    sources = [["a", "b", "c"][i % 3] for i in range(n)]
    labels = [i % 3 for i in range(n)]  # the label is the source
    x = torch.randn(n, len(audit.FEATURES), generator=g)
    r = audit.shortcut_baseline(x, labels, [f"p{i // 2}" for i in range(n)], sources, "ABC")
    assert r["with_source"] == 1.0 and r["image_properties"] < 0.6
    assert r["balanced_with_source"] == 1.0 and r["balanced_image_properties"] < 0.6
    assert abs(r["chance"] - 1 / 3) < 0.01 and abs(r["balanced_chance"] - 1 / 3) < 0.01
    # a rare class told by its source alone: balanced accuracy sees what accuracy hides
    labels = [1] * 114 + [0] * 6
    sources = ["big"] * 114 + ["small"] * 6
    r = audit.shortcut_baseline(x, labels, [f"p{i}" for i in range(n)], sources, "AB")
    assert r["chance"] == 0.95 and r["balanced_with_source"] == 1.0
    assert r["recall_with_source"] == {"A": 1.0, "B": 1.0}


def test_a_class_from_one_source_is_warned_of():
    items = datasets.Items([None] * 10, [0] * 5 + [1] * 5, list("abcdefghij"),
                           ["x"] * 5 + ["y"] * 4 + ["x"])
    table, warnings = audit.source_table(["COVID-19", "normal"], items)
    assert table["x"] == {"COVID-19": 5, "normal": 1}
    assert [w.split(":")[0] for w in warnings] == ["COVID-19", "normal"]


def test_edge_cases_give_answers_not_noise():
    assert audit.near_duplicates(torch.zeros(0, 64, 64), torch.rand(3, 64, 64)) == []
    assert audit.near_duplicates(torch.rand(3, 64, 64), torch.zeros(0, 64, 64)) == []
    x = torch.randn(6, len(audit.FEATURES))
    with pytest.raises(ValueError, match="2 patients or more"):
        audit.logistic_cv(x, [0, 1] * 3, ["p"] * 6)
    acc, recall = audit.logistic_cv(x, [0, 1] * 3, ["p", "q"] * 3)  # 2 folds of one patient
    assert 0 <= acc <= 1 and set(recall) == {0, 1}
    one = datasets.Items([None] * 3, [0] * 3, list("abc"), ["s"] * 3)
    assert audit.source_table(["A"], one)[1] == []  # one class: nothing to compare with
