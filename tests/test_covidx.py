"""tools/make_covidx_v1.py on a tiny synthetic copy of COVIDx v1's two sources: v1's own split
reproduced, v1's rules without it, and bad sources refused before anything is written."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tools import make_covidx_v1
from machinery import covidx, datasets

META = ("Patientid,offset,sex,age,finding,survival,view,modality,date,location,filename\n"
        "2,0,M,65,COVID-19,Y,PA,X-ray,,,c2a.jpeg\n"
        "2,3,M,65,COVID-19,Y,PA,X-ray,,,c2b.jpeg\n"
        "4,0,F,50,COVID-19,Y,PA,X-ray,,,c4.jpeg\n"
        "5,0,F,50,COVID-19,Y,AP,X-ray,,,c5-ap.jpeg\n"  # not PA: left out by v1's rule
        "6,0,M,40,SARS,Y,PA,X-ray,,,s6.jpeg\n"
        "7,0,M,40,Streptococcus,Y,PA,X-ray,,,st7.jpeg\n"
        "8,0,M,40,ARDS,Y,PA,X-ray,,,a8.jpeg\n")  # not a v1 finding
KERMANY = {"train/NORMAL": ["IM-0115-0001.jpeg", "NORMAL2-IM-0272-0001.jpeg"],
           "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person2_virus_4.jpeg"],
           "val/NORMAL": ["NORMAL2-IM-1427-0001.jpeg"],
           "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
           "test/NORMAL": ["IM-0001-0001.jpeg"],
           "test/PNEUMONIA": ["person1_virus_6.jpeg", "person100_bacteria_477.jpeg"]}
V1_TRAIN = ["2 c2a.jpeg COVID-19", "2 c2b.jpeg COVID-19", "6 s6.jpeg viral", "7 st7.jpeg bacteria",
            "10000115 IM-0115-0001.jpeg normal", "10000272 NORMAL2-IM-0272-0001.jpeg normal",
            "10001 person1_bacteria_1.jpeg bacteria", "10002 person2_virus_4.jpeg viral",
            "10001427 NORMAL2-IM-1427-0001.jpeg normal"]
V1_TEST = ["4 c4.jpeg COVID-19", "10000001 IM-0001-0001.jpeg normal",
           "10001 person1_virus_6.jpeg viral", "1000100 person100_bacteria_477.jpeg bacteria"]


def film(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 32), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture
def sources(tmp_path):
    cohen, kermany, net = tmp_path / "cohen", tmp_path / "chest_xray", tmp_path / "COVID-Net"
    (cohen / "images").mkdir(parents=True)
    (cohen / "metadata.csv").write_text(META)
    seed = 0
    for line in META.splitlines()[1:]:
        film(cohen / "images" / line.split(",")[-1], seed := seed + 1)
    for folder, names in KERMANY.items():
        (kermany / folder).mkdir(parents=True)
        for n in names:
            film(kermany / folder / n, seed := seed + 1)
    net.mkdir()
    (net / "train_split.txt").write_text("\n".join(V1_TRAIN) + "\n")
    (net / "test_split.txt").write_text("\n".join(V1_TEST) + "\n")
    return cohen, kermany, net


def listing(root):
    return sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, fs in os.walk(root)
                  for p in fs)


def run(cohen, kermany, out, *more):
    return make_covidx_v1.main(["--cohen", str(cohen), "--kermany", str(kermany), "--out",
                                str(out), *map(str, more)])


def test_v1_split_files_are_reproduced_exactly(sources, tmp_path, capsys):
    cohen, kermany, net = sources
    untouched = listing(cohen) + listing(kermany)
    out = tmp_path / "covidx"
    run(cohen, kermany, out, "--covid-net", net)
    rows = {s: [line.split() for line in open(out / f"{s}.txt")] for s in ("train", "test")}
    assert [r[1] for r in rows["train"]] == [line.split()[1] for line in V1_TRAIN]
    assert [r[1] for r in rows["test"]] == [line.split()[1] for line in V1_TEST]
    assert [r[2] for r in rows["train"]][2:4] == ["viral", "bacterial"]  # bacteria -> bacterial
    # ids name the source and Kermany's folder: person1 of train is not person1 of test
    assert rows["train"][6][0] == "kermany_train_person1"
    assert rows["test"][2][0] == "kermany_test_person1" and rows["test"][0][0] == "cohen_4"
    assert {r[3] for r in rows["test"]} == {"cohen", "kermany"}
    m = json.load(open(out / "manifest.json"))
    f = m["films"][0]
    assert f["sha256"] == make_covidx_v1.sha256(out / "train" / f["file"]) and f["from"] == \
        "images/c2a.jpeg"
    assert m["counts"]["test"] == {"COVID-19": 1, "bacterial": 1, "normal": 1, "viral": 1}
    assert "(v1    66)" in capsys.readouterr().out  # counts against v1's
    classes, splits = datasets.load_dataset(str(out))  # train.py reads it as it is
    assert classes == covidx.CLASSES and len(splits["train"]) == 9
    # again: nothing to copy, the same files; the sources never changed
    stamp, text = listing(out / "train") + listing(out / "test"), open(out / "train.txt").read()
    run(cohen, kermany, out, "--covid-net", net)
    assert "13 films (13 already there)" in capsys.readouterr().out
    assert listing(out / "train") + listing(out / "test") == stamp
    assert open(out / "train.txt").read() == text
    assert listing(cohen) + listing(kermany) == untouched


def test_missing_films_are_named_by_source_and_nothing_is_written(sources, tmp_path):
    cohen, kermany, net = sources
    os.remove(cohen / "images" / "s6.jpeg")
    os.remove(kermany / "val" / "NORMAL" / "NORMAL2-IM-1427-0001.jpeg")
    out = tmp_path / "covidx"
    with pytest.raises(datasets.DataError, match="(?s)1 listed cohen films not found.*train: "
                       "s6.jpeg.*1 listed kermany films not found.*NORMAL2-IM-1427"):
        run(cohen, kermany, out, "--covid-net", net)
    assert not out.exists()
    rows, missing = run(cohen, kermany, out, "--covid-net", net, "--allow-missing")
    assert len(rows["train"]) == 7 and missing["cohen"] == ["train: s6.jpeg"]
    assert json.load(open(out / "manifest.json"))["missing"]["kermany"] == [
        "train: NORMAL2-IM-1427-0001.jpeg"]


def test_v1_rules_without_split_files(sources, tmp_path):
    cohen, kermany, _ = sources
    rows, _ = run(cohen, kermany, tmp_path / "covidx", "--seed", "3")
    names = {s: {os.path.basename(r[1]) for r in rs} for s, rs in rows.items()}
    both = names["train"] | names["test"]
    assert "c5-ap.jpeg" not in both and "a8.jpeg" not in both  # AP view, ARDS: not v1's
    assert {"c2a.jpeg", "c2b.jpeg", "c4.jpeg", "s6.jpeg", "st7.jpeg"} <= both
    assert "NORMAL2-IM-1427-0001.jpeg" in names["train"]  # val is train, as in v1
    assert "person1_virus_6.jpeg" in names["test"]
    pats = {s: {r[0] for r in rs} for s, rs in rows.items()}
    assert not pats["train"] & pats["test"]
    assert {"c2a.jpeg", "c2b.jpeg"} <= names["train"] or {"c2a.jpeg", "c2b.jpeg"} <= names["test"]


def test_later_metadata_layouts_are_read_and_unknown_ones_refused(sources, tmp_path):
    cohen, kermany, _ = sources
    (cohen / "metadata.csv").write_text(
        META.replace("Patientid", "patientid").replace(",COVID-19,", ",Pneumonia/Viral/COVID-19,"))
    assert len(covidx.cohen_rows(covidx.read_metadata(str(cohen)))) == 5
    (cohen / "metadata.csv").write_text(META.replace("finding", "diagnosis"))
    out = tmp_path / "covidx"
    with pytest.raises(datasets.DataError, match="no column for finding.*its columns are"):
        run(cohen, kermany, out)
    assert not out.exists()


def test_bad_sources_are_refused_before_writing(sources, tmp_path):
    cohen, kermany, net = sources
    out = tmp_path / "covidx"
    os.rename(kermany / "test" / "NORMAL", tmp_path / "moved")
    with pytest.raises(datasets.DataError, match="missing .*test/NORMAL"):
        run(cohen, kermany, out)
    os.rename(tmp_path / "moved", kermany / "test" / "NORMAL")
    (kermany / "test" / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(datasets.DataError, match="(?s)1 films cannot be read.*IM-0001-0001"):
        run(cohen, kermany, out, "--covid-net", net)
    with pytest.raises(datasets.DataError, match="is in the source"):
        run(cohen, kermany, cohen / "out")
    os.symlink(kermany / "train", tmp_path / "link")  # a link into a source: followed
    with pytest.raises(datasets.DataError, match="is in the source"):
        run(cohen, kermany, tmp_path / "link" / "out")
    with pytest.raises(datasets.DataError, match="the folder of v1's split files"):
        run(cohen, kermany, net, "--covid-net", net)
    (tmp_path / "other").mkdir()  # another data set's folder: never written over
    (tmp_path / "other" / "train.txt").write_text("p a.png normal\n")
    with pytest.raises(datasets.DataError, match="did not make"):
        run(cohen, kermany, tmp_path / "other")
    assert not out.exists() and not (cohen / "out").exists()
    assert os.listdir(tmp_path / "other") == ["train.txt"]


def test_a_second_build_replaces_the_first_whole(sources, tmp_path):
    cohen, kermany, net = sources
    out = tmp_path / "covidx"
    run(cohen, kermany, out, "--seed", "1")  # v1's rules: c4.jpeg in train with this seed
    assert (out / "train" / "c4.jpeg").is_file()
    (out / "test" / "extra.png").write_bytes(b"mine")  # not the script's: left alone
    with open(out / "train" / "IM-0115-0001.jpeg", "wb") as f:  # damaged: copied again
        f.write(b"\xff\xd8")
    rows, _ = run(cohen, kermany, out, "--covid-net", net)
    listed = {s: {line.split()[1] for line in open(out / f"{s}.txt")} for s in rows}
    # c4.jpeg is in test now: the stale copy in train is gone
    assert set(os.listdir(out / "train")) == listed["train"]
    assert set(os.listdir(out / "test")) == listed["test"] | {"extra.png"}
    assert make_covidx_v1.sha256(out / "train" / "IM-0115-0001.jpeg") == make_covidx_v1.sha256(
        kermany / "train" / "NORMAL" / "IM-0115-0001.jpeg")
    run(cohen, kermany, tmp_path / "linked", "--covid-net", net, "--link", "hardlink")
    assert os.path.samefile(tmp_path / "linked" / "test" / "c4.jpeg", cohen / "images" / "c4.jpeg")
