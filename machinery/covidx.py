"""COVIDx v1, the data set the paper used, rebuilt from its two public sources
(tools/make_covidx_v1.py).

    rules = split_cohen(cohen_rows(read_metadata(cohen))), kermany_rows(kermany_index(kermany))
    v1_split, missing = from_split_files(split_files, images, kermany_index(kermany), problems)

COVIDx v1 (COVID-Net, 25 March 2020; lindawangg/COVID-Net at commit 55406b3, files
train_split.txt / test_split.txt, script create_COVIDx.ipynb) joined:
  - the covid-chestxray-dataset (Cohen et al.; github.com/ieee8023/covid-chestxray-dataset):
    metadata.csv and images/. v1 kept the PA views whose finding was COVID-19 (-> COVID-19),
    SARS or MERS (-> viral) or Streptococcus (-> bacterial), and put ~10% of each class's
    patients (at least one) in test;
  - Kermany et al.'s pediatric pneumonia films (Kaggle "chest-xray-pneumonia", Mendeley
    doi:10.17632/rscbjbr9sj): chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}; v1 took train and
    val as train and test as test, and the kind of pneumonia from the file name (bacteria, virus).
Expected counts: train 5,310 (normal 1,349, bacterial 2,540, viral 1,355, COVID-19 66), test
639 (234 / 246 / 149 / 10).

Patient ids. COVID-Net's ids ('1000' + the number in a Kermany name) give different children
one id: person1 is bacterial in Kermany's train folder and viral in its test folder, and
IM-0272 and NORMAL2-IM-0272 are two numbering series. So the ids written here name the source
and, for Kermany, its folder: cohen_8, kermany_train_person1, kermany_test_NORMAL2-IM-0272.
Whether one child is in both Kermany folders under two numbers is what the audit's duplicate
search can tell; the names cannot.
"""
import csv
import os
import random
import re

from machinery.datasets import DataError

CLASSES = ["COVID-19", "bacterial", "normal", "viral"]
EXPECTED = {"train": {"normal": 1349, "bacterial": 2540, "viral": 1355, "COVID-19": 66},
            "test": {"normal": 234, "bacterial": 246, "viral": 149, "COVID-19": 10}}
V1_COMMIT = "55406b3"  # lindawangg/COVID-Net: the last commit with v1's split files at its root
V1_FILES = [("train_split.txt", "test_split.txt"),  # at 55406b3 and before
            ("archive/train_split_v1.txt", "archive/test_split_v1.txt")]  # 28 March 2020 on
# v1's finding -> class (create_COVIDx.ipynb); later metadata.csv write "Pneumonia/Viral/SARS"
FINDINGS = {"COVID-19": "COVID-19", "SARS": "viral", "MERS": "viral", "MERS-CoV": "viral",
            "Streptococcus": "bacterial"}
LABELS = {"bacteria": "bacterial", "bacterial": "bacterial", "viral": "viral",
          "normal": "normal", "COVID-19": "COVID-19"}  # v1's split-file labels -> ours
KERMANY_NAME = re.compile(r"^(person\d+|(?:NORMAL2-)?IM-\d+)[-_].*\.jpe?g$", re.IGNORECASE)
# The columns v1 read, and what later versions of metadata.csv call them
COLUMNS = {"patient": ("Patientid", "patientid", "patient_id"), "finding": ("finding",),
           "view": ("view",), "filename": ("filename",)}


def read_metadata(cohen):
    """The covid-chestxray-dataset's metadata.csv -> [{patient, finding, view, filename}]."""
    path = os.path.join(cohen, "metadata.csv")
    if not os.path.isfile(path):
        raise DataError(f"--cohen {cohen}: no metadata.csv; give the folder of a checkout of "
                        "github.com/ieee8023/covid-chestxray-dataset (metadata.csv, images/)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        cols = {k: next((n for n in names if n in header), None) for k, names in COLUMNS.items()}
        missing = [k for k, n in cols.items() if n is None]
        if missing:
            looked = "; ".join(" or ".join(COLUMNS[k]) for k in missing)
            raise DataError(
                f"{path}: no column for {', '.join(missing)} (looked for {looked}); its columns "
                f"are {', '.join(header[:20])}. A version of metadata.csv this script does not "
                "know: use a checkout of March 2020 (v1's, e.g. commit 548bb58 of 24 March)")
        reader.fieldnames = header
        return [{k: (r.get(c) or "").strip() for k, c in cols.items()} for r in reader]


def finding_class(finding):
    """v1's class of a finding, or None: 'COVID-19' and 'Pneumonia/Viral/COVID-19' alike."""
    return FINDINGS.get(finding.split("/")[-1].strip())


def cohen_rows(meta):
    """v1's rule: PA views of a mapped finding -> [(patient, filename, label, 'cohen')]."""
    return [(f"cohen_{r['patient']}", r["filename"], finding_class(r["finding"]), "cohen")
            for r in meta if r["view"] == "PA" and finding_class(r["finding"])]


def kermany_index(kermany):
    """{Kermany split: {file name: path}} of chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}."""
    out, missing = {"train": {}, "val": {}, "test": {}}, []
    for split in out:
        for cls in ("NORMAL", "PNEUMONIA"):
            d = os.path.join(kermany, split, cls)
            if os.path.isdir(d):
                out[split].update((f, os.path.join(d, f)) for f in sorted(os.listdir(d))
                                  if f.lower().endswith((".jpeg", ".jpg")))
            elif split != "val":  # v1 counts its 16 films, but a copy without them is usable
                missing.append(d)
    if missing:
        raise DataError(f"--kermany {kermany}: missing {', '.join(missing)}; give the chest_xray "
                        "folder of Kaggle's chest-xray-pneumonia (train/, val/, test/, each "
                        "with NORMAL/ and PNEUMONIA/)")
    return out


def kermany_patient(split, name):
    """kermany_train_person1 (val counts as train: it continues train's numbering)."""
    m = KERMANY_NAME.match(name)
    return f"kermany_{'test' if split == 'test' else 'train'}_{m.group(1) if m else name}"


def kermany_rows(index):
    """Every Kermany film -> {'train' | 'test': [(patient, path, label, 'kermany')]}: normal
    from its folder, the kind of pneumonia from its name (person1_bacteria_1, person2_virus_4)."""
    rows = {"train": [], "test": []}
    for split, files in index.items():
        for name, path in files.items():
            label = ("normal" if os.path.basename(os.path.dirname(path)).upper() == "NORMAL"
                     else "bacterial" if "bacteria" in name.lower() else "viral")
            rows["test" if split == "test" else "train"].append(
                (kermany_patient(split, name), path, label, "kermany"))
    return rows


def split_cohen(rows, frac=0.1, seed=0):
    """v1's split of the Cohen films: per class, round(frac x its patients) (at least one)
    patients to test, drawn with `seed`; a patient in test has all films there.

    v1 drew them with random.sample on the notebook's own state; its test patients (8, 31;
    19, 20, 36, 42, 86) are in its split files, which only --covid-net reproduces."""
    rng, test = random.Random(seed), set()
    for c in CLASSES:
        pats = sorted({p for p, _, lab, _ in rows if lab == c})
        if pats:
            test.update(rng.sample(pats, max(1, round(frac * len(pats)))))
    return {"train": [r for r in rows if r[0] not in test],
            "test": [r for r in rows if r[0] in test]}


def find_split_files(covid_net):
    """v1's (train, test) split files in a COVID-Net checkout or a folder holding them."""
    for tr, te in V1_FILES:
        pair = os.path.join(covid_net, tr), os.path.join(covid_net, te)
        if all(os.path.isfile(p) for p in pair):
            return pair
    raise DataError(
        f"--covid-net {covid_net}: neither train_split.txt/test_split.txt nor archive/"
        f"train_split_v1.txt/test_split_v1.txt; in a clone of github.com/lindawangg/COVID-Net "
        f"run `git checkout {V1_COMMIT}`, or give the two files with --train-split/--test-split")


def read_v1_split(path, problems):
    """A v1 split file, `patient filename label` -> [(patient, filename, label)]."""
    out, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) >= 3 and parts[2] in LABELS:
                out.append((parts[0], parts[1], LABELS[parts[2]]))
            elif parts:  # a blank line is no problem
                bad.append(f"{os.path.basename(path)} line {n}: {line.strip()[:80]!r}")
    problems.add(f"lines of {path} are not `patient filename label` with a v1 label", bad,
                 f" ({', '.join(LABELS)})")
    return out


def from_split_files(files, cohen_images, kermany, problems):
    """v1's own split: each listed file found in its source -> ({split: rows}, {source:
    [missing file names]}). Kermany films are looked up in the folders v1 took them from
    (train and val for train, test for test); the others in the Cohen images/."""
    found, missing = {"train": [], "test": []}, {"cohen": [], "kermany": []}
    cohen_files = set(os.listdir(cohen_images))
    for split, path in zip(found, files):
        folders = ("train", "val") if split == "train" else ("test",)
        for pid, name, label in read_v1_split(path, problems):
            if KERMANY_NAME.match(name):
                where = next((k for k in folders if name in kermany[k]), None)
                if where is None:
                    missing["kermany"].append(f"{split}: {name}")
                    continue
                found[split].append((kermany_patient(where, name), kermany[where][name],
                                     label, "kermany"))
            elif name in cohen_files:
                found[split].append((f"cohen_{pid}", os.path.join(cohen_images, name), label,
                                     "cohen"))
            else:
                missing["cohen"].append(f"{split}: {name}")
    return found, missing
