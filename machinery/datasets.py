"""Chest X-ray data sets: read COVIDx or an ImageFolder tree and check it, all at once.

    problems = Problems()                                  # gathers what is wrong ...
    classes, splits = load_dataset("path/to/covidx", problems=problems)   # or "phantom"
    train = films.load_pixels(splits["train"], (128, 224, 229), cache_dir, problems=problems)
    problems.check()                                       # ... and raises it in one message

    tr, va = split_patients(splits["train"], 0.1, seed=0)   # validation patients held out

Reading and checking the split files lives here, and the patient-level split; decoding the
images (once, cached) lives in films.py, which adds what it finds (unreadable files) to the
same Problems. The layouts read are in docs/data.md.
"""
import csv
import glob
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from machinery import phantom

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """The data set is not usable as given; the message lists what is wrong and where."""


def run_cli(main, *args):
    """main(*args), ending the program with the message alone on a DataError: the traceback
    would add nothing about the data that the message does not say."""
    try:
        return main(*args)
    except DataError as e:
        sys.exit(f"error: {e}")


class Problems(list):
    """What is wrong with a data set, gathered while reading and decoding it, so that one
    message lists everything (rather than one fix, one rerun, the next error)."""

    def add(self, what, entries, fix=""):
        """'N <what><fix>:' and the first ten entries, one per line; nothing when none."""
        if entries:
            self.append(f"{len(entries)} {what}{fix}:\n    " + "\n    ".join(entries[:10]) +
                        ("\n    ..." if len(entries) > 10 else ""))

    def check(self):
        if self:
            raise DataError("the data set is not usable:\n  " + "\n  ".join(self))


@dataclass
class Items:
    """One split: parallel lists, one entry per image."""
    paths: list = field(default_factory=list)  # image files (None for phantoms)
    labels: list = field(default_factory=list)  # class indices
    patients: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    pixels: np.ndarray = None  # phantoms only: (N, 256, 256) uint8, rendered in memory

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        return Items([self.paths[i] for i in idx], [self.labels[i] for i in idx],
                     [self.patients[i] for i in idx], [self.sources[i] for i in idx],
                     None if self.pixels is None else self.pixels[idx])


# ---------------------------------------------------------------------------------------------
# Reading a data set: COVIDx split files or an ImageFolder tree

# (train, test) split-file names of the COVIDx releases, most recent layout first
SPLIT_NAMES = [("train.txt", "test.txt"), ("train_split.txt", "test_split.txt"),
               ("train_split_v3.txt", "test_split_v3.txt"),
               ("train_split_v2.txt", "test_split_v2.txt")]


def find_split_files(root):
    """The (train, test) split files in root, or None when root has none (ImageFolder)."""
    for tr, te in SPLIT_NAMES:
        if os.path.isfile(os.path.join(root, tr)) and os.path.isfile(os.path.join(root, te)):
            return os.path.join(root, tr), os.path.join(root, te)
    found = sorted(glob.glob(os.path.join(root, "train_COVIDx*.txt")))  # COVIDx 5 .. 9A
    pairs = [(f, f.replace("train_", "test_")) for f in found]
    pairs = [p for p in pairs if os.path.isfile(p[1])]
    if len(pairs) > 1:
        raise DataError(f"{root} holds several COVIDx versions ({', '.join(p[0] for p in pairs)});"
                        " choose one with --train-split and --test-split")
    return pairs[0] if pairs else None


def read_split_file(path):
    """Lines `patient_id filename label [source]` -> ([(patient, filename, label, source)],
    [a description of each malformed line])."""
    rows, bad = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:  # one bad byte is one malformed line, not a traceback
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as e:
                bad.append(f"{os.path.basename(path)} line {n}: not UTF-8 text (byte "
                           f"{raw[e.start]:#04x} at column {e.start + 1}); save the file as "
                           "UTF-8")
                continue
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (3, 4):
                bad.append(f"{os.path.basename(path)} line {n}: {line.strip()[:80]!r}")
                continue
            rows.append((parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""))
    return rows, bad


def read_image_folder(root, base=None):
    """root/<class>/<image> -> ([(patient, path, label, source)], class folder names).

    An ImageFolder tree names no patients: each image counts as its own (its path relative to
    base), so no patient-level check or split can be made. Prefer split files where you can.
    """
    rows, other = [], []
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and d.name[0] != ".")
    for cls in classes:
        for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
            for f in sorted(files):
                path = os.path.join(dirpath, f)
                if f.lower().endswith(IMAGE_EXTS):
                    rows.append((os.path.relpath(path, base or root), path, cls, ""))
                else:
                    other.append(path)
    if other:
        print(f"warning: skipped {len(other)} files that are not images in {root} (e.g. "
              f"{', '.join(other[:3])})")
    return rows, classes


def apply_subtypes(rows, path):
    """4 classes from 3: 'pneumonia' becomes its subtype (bacterial, viral) from a CSV file
    `filename,subtype`; pneumonia of unknown kind is left out."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            subtypes = {r["filename"]: r["subtype"] for r in csv.DictReader(f)}
    except UnicodeDecodeError as e:
        raise DataError(f"--subtypes {path}: not UTF-8 text (byte {e.object[e.start]:#04x} "
                        f"at offset {e.start}); save the file as UTF-8") from e
    except KeyError as e:
        raise DataError(f"--subtypes {path}: needs a header line with the columns filename "
                        f"and subtype (no {e} column)") from e
    out = []
    for pid, fname, label, source in rows:
        if label.lower() == "pneumonia":
            label = subtypes.get(os.path.basename(fname), "")
            if label not in ("bacterial", "viral"):
                continue
        out.append((pid, fname, label, source))
    return out


def hold_out_sources(rows, names):
    """--test-sources: {"train": the other sources' rows, "test": these sources' rows}, taken
    from both split files: a test on films of collections the model never saw (DeGrave,
    Janizek & Lee, Nature Machine Intelligence 2021). Where a class would be left with no
    training film, a DataError says so: such a split cannot measure anything."""
    pooled = rows["train"] + rows["test"]
    known = sorted({r[3] for r in pooled if r[3]})
    flag = f"--test-sources {','.join(names)}"
    if not known:
        raise DataError(f"{flag}: the split files name no sources (their 4th column; an "
                        "ImageFolder tree has none), so none can be held out")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"{flag}: no source {', '.join(unknown)} in the split files (theirs: "
                        f"{', '.join(known)})")
    split = {"train": [r for r in pooled if r[3] not in names],
             "test": [r for r in pooled if r[3] in names]}
    # a patient with films in a held-out source and another (one case filed twice) trains
    # with none: the test keeps to patients the model never saw
    tested = {r[0] for r in split["test"]}
    both = [r for r in split["train"] if r[0] in tested]
    if both:
        split["train"] = [r for r in split["train"] if r[0] not in tested]
        print(f"{flag}: {len(both)} training film(s) left out, of patients with films in the "
              f"held-out sources too ({', '.join(sorted({r[0] for r in both})[:5])})")
    lost = sorted({r[2] for r in pooled} - {r[2] for r in split["train"]})
    if lost:
        where = {c: sorted({r[3] or "(none)" for r in pooled if r[2] == c}) for c in lost}
        raise DataError(f"{flag}: " + "; ".join(
            f"{c} would have no training film left (all its films come from "
            f"{', '.join(where[c])})" for c in lost) + ". A model cannot learn a class it "
            "never sees, so this split would measure nothing. Hold out sources whose classes "
            "other sources have too. Where a class comes from one source alone (COVIDx v1's "
            "COVID-19 films, all from one collection), the source and the class cannot be told "
            "apart at all: no held-out test can say whether a model learned the disease or "
            "the collection; --hide lungs can still show how much of a score the film's "
            "border carries.")
    return split


def phantom_dataset(n_train=2000, seed=0):
    """(class names, {"train": Items, "test": Items}) of phantoms (phantom.py), the same for
    the same seed: what --data phantom loads."""
    splits = {}
    for k, (split, n) in enumerate([("train", n_train), ("test", max(40, n_train // 5))]):
        labels, patients, pixels = phantom.make_split(n, [seed, k], f"phantom-{split}-")
        splits[split] = Items([None] * n, labels, patients, ["phantom"] * n, pixels)
    return list(phantom.CLASSES), splits


def load_dataset(root, train_split=None, test_split=None, image_dir=None, subtypes=None,
                 n_phantoms=2000, seed=0, allow_patient_overlap=False, allow_missing_class=False,
                 problems=None, test_sources=""):
    """Read and check a data set -> (class names, {"train": Items, "test": Items}).

    root is a COVIDx folder (split files plus train/ and test/ image folders, or all images in
    `image_dir`), an ImageFolder tree (root/train/<class>/*, root/test/<class>/*), or
    "phantom" for synthetic radiographs. test_sources ("name,.."): the test split is those
    sources' films of both split files, training the rest (hold_out_sources). Class names are
    sorted. What is wrong with the data raises a DataError, or, given a Problems list, is added
    to it (the images with problems left out of the splits) so that decoding can look for more
    before one message says all.
    """
    if root == "phantom":
        if test_sources:
            raise DataError(f"--test-sources {test_sources}: phantoms have one source; give "
                            "a data set whose split files name their sources")
        return phantom_dataset(n_phantoms, seed)
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: no such folder. Give a COVIDx or ImageFolder root, "
                        "or --data phantom for synthetic images.")
    if train_split or test_split:  # relative to root (join keeps an absolute path as it is)
        files = [os.path.join(root, train_split or "train.txt"),
                 os.path.join(root, test_split or "test.txt")]
    else:
        files = find_split_files(root)
    rows, malformed, named = {}, [], set()  # named: classes the layout promises
    if files:
        for split, f in zip(("train", "test"), files):
            if not os.path.isfile(f):
                raise DataError(f"split file {f} not found")
            folder = image_dir or os.path.join(root, split)
            split_rows, bad = read_split_file(f)
            malformed += bad
            rows[split] = [(p, os.path.join(folder, fn), lab, src)
                           for p, fn, lab, src in split_rows]
    elif all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")):
        for s in ("train", "test"):
            rows[s], names = read_image_folder(os.path.join(root, s), root)
            named.update(names)
    else:  # root/<class>/*: hold out 20% of the patients as the test split
        found, names = read_image_folder(root)
        named = set(names)
        if not found:
            raise DataError(f"{root} has neither COVIDx split files (train.txt/test.txt, "
                            "train_split.txt, train_COVIDx*.txt) nor class folders of images; "
                            "name the split files with --train-split/--test-split")
        print(f"{root}: no test split given; holding out 20% of the patients as test")
        labels = [names.index(r[2]) for r in found]
        tr, te = split_patients(Items(labels=labels, patients=[r[0] for r in found]), 0.2, seed)
        rows = {"train": [found[i] for i in tr], "test": [found[i] for i in te]}
    if subtypes:
        rows = {s: apply_subtypes(r, subtypes) for s, r in rows.items()}
        named = {c for c in named if c.lower() != "pneumonia"} | {"bacterial", "viral"}
    if test_sources:
        rows = hold_out_sources(rows, test_sources.split(","))
    classes = sorted(named | {r[2] for rs in rows.values() for r in rs})
    found = Problems() if problems is None else problems
    check_rows(rows, classes, found, malformed, named, allow_patient_overlap, allow_missing_class)
    missing = {r[1]: 1 for rs in rows.values() for r in rs if not os.path.isfile(r[1])}
    found.add("listed images are missing", list(missing), " (check --data / --image-dir)")
    if problems is None:
        found.check()
    idx = {c: i for i, c in enumerate(classes)}
    splits = {}
    for s, rs in rows.items():
        rs = [r for r in rs if r[1] not in missing]
        splits[s] = Items([r[1] for r in rs], [idx[r[2]] for r in rs], [r[0] for r in rs],
                          [r[3] for r in rs])
    return classes, splits


def check_rows(rows, classes, problems, malformed=(), named=(), allow_patient_overlap=False,
               allow_missing_class=False):
    """Add to `problems` what is wrong before any image is opened: malformed lines, empty
    splits, unknown labels, classes with no images (of `named`, the classes the folders or
    --subtypes promise, and of train's), files listed twice, patients in both splits."""
    problems.add("malformed lines", list(malformed),
                 " (expected `patient_id filename label [source]`)")
    for split, rs in rows.items():
        if not rs:
            problems.append(f"the {split} split is empty")
    counts = {s: Counter(r[2] for r in rs) for s, rs in rows.items()}
    if rows["train"] and rows["test"] and not allow_missing_class:
        unknown = [c for c in classes if not counts["train"][c] and c not in named]
        problems.add("test labels that train does not have", [
            f"{c} ({counts['test'][c]} images)" for c in unknown],
            " (a typo, or split files of two versions? --allow-missing-class goes on anyway)")
        why = {"train": "the model cannot learn it", "test": "its sensitivity is unmeasurable"}
        where = {c: [s for s in rows if not counts[s][c]] for c in classes if c not in unknown}
        problems.add("classes with no images", [
            f"{c}: none in {' or '.join(w)} ({'; '.join(why[s] for s in w)})"
            for c, w in where.items() if w],
            " (add images or fix the labels, or pass --allow-missing-class to go on anyway)")
    seen = Counter(r[1] for rs in rows.values() for r in rs)
    problems.add("files listed more than once", sorted(p for p, n in seen.items() if n > 1))
    shared = {r[0] for r in rows["train"]} & {r[0] for r in rows["test"]}
    if shared and not allow_patient_overlap:
        problems.append(f"{len(shared)} patients are in both train and test (e.g. "
                        f"{', '.join(sorted(shared)[:5])}): test accuracy would be inflated. "
                        "Fix the split, or pass --allow-patient-overlap to go on anyway")


def split_patients(items, frac, seed):
    """(train, val) index lists with no patient on both sides, ~frac of each class in val.

    Patient-level, because two films of one patient are nearly the same picture: splitting by
    image would let the validation score reward memorised patients.
    """
    if frac <= 0:
        return list(range(len(items))), []
    rng = random.Random(seed)
    by_patient = {}
    for i, p in enumerate(items.patients):
        by_patient.setdefault(p, []).append(i)
    val = []
    for c in sorted(set(items.labels)):
        pats = sorted(p for p, ix in by_patient.items() if items.labels[ix[0]] == c)
        rng.shuffle(pats)
        want = frac * sum(len(by_patient[p]) for p in pats)
        taken = 0
        for p in pats[:-1]:  # the last patient stays: every class keeps training images
            if taken >= want:
                break
            val += by_patient[p]
            taken += len(by_patient[p])
    val_set = set(val)
    return [i for i in range(len(items)) if i not in val_set], sorted(val)
