"""Rebuild COVIDx v1, the paper's data set, from local copies of its two public sources.

    # v1's own split (exact): a COVID-Net clone at commit 55406b3, or the two files
    python tools/make_covidx_v1.py --cohen covid-chestxray-dataset --kermany chest_xray \\
        --covid-net COVID-Net --out covidx-v1
    # v1's rules without its split files: PA views, 10% of the Cohen patients to test
    python tools/make_covidx_v1.py --cohen covid-chestxray-dataset --kermany chest_xray \\
        --out covidx-v1
    python train.py --data covidx-v1

Writes --out/train/ and --out/test/ (the films, copied: the sources are never changed),
train.txt and test.txt (`patient filename label source`, labels normal, bacterial, viral,
COVID-19) and manifest.json (every film's SHA-256, its source file, the sources' own files and
the counts). Prints the counts against v1's (train 5,310, test 639) and every listed film it
could not find, by source, with what to do. Checks everything before writing anything; run it
again to resume an interrupted copy (films already there with the right checksum are kept).
The sources and the patient ids: machinery/covidx.py. Step by step:
docs/data.md#covidx-v1-step-by-step.
"""
import argparse
import json
import os
import shutil
import sys
import time

from PIL import Image
from tqdm import tqdm

# run as `python tools/make_covidx_v1.py`: the project's root on the path, for machinery/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machinery import covidx
from machinery.audit import sha256
from machinery.flags import Help
from machinery.datasets import DataError, Problems, check_rows, run_cli
from machinery.run import git_commit


def unreadable(paths):
    """The films PIL cannot decode whole: 'path (why)'."""
    bad = []
    for p in tqdm(paths, desc="checking the films", unit="img", leave=False, disable=None):
        try:
            with Image.open(p) as img:
                img.draft("L", (64, 64))  # JPEG: decoded at 1/8 scale, every byte still read
                img.load()
        except Exception as e:  # truncated, corrupt, not an image
            bad.append(f"{p} ({type(e).__name__}: {e})")
    return bad


def count_table(rows):
    """Films per split and class, built against v1's."""
    lines = [f"{'':>6} " + " ".join(f"{c:>17}" for c in covidx.CLASSES) + f" {'total':>17}"]
    for split, rs in rows.items():
        n = {c: sum(r[2] == c for r in rs) for c in covidx.CLASSES}
        exp = covidx.EXPECTED[split]
        cells = [f"{n[c]:>6} (v1 {exp[c]:>5})" for c in covidx.CLASSES]
        lines.append(f"{split:>6} " + " ".join(f"{c:>17}" for c in cells) +
                     f" {len(rs):>6} (v1 {sum(exp.values()):>5})")
    return "\n".join(lines)


def place(src, dst, link):
    """src -> dst (copy, hardlink or symlink), through a temporary name: an interrupted run
    leaves no half film under its real name."""
    tmp = f"{dst}.{os.getpid()}.tmp"
    if link == "symlink":
        os.symlink(os.path.abspath(src), tmp)
    elif link == "hardlink":
        try:
            os.link(src, tmp)
        except OSError:  # another file system
            shutil.copyfile(src, tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_atomic(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def check_out_folder(out, sources, split_dirs):
    """The real path of --out: never in a source, nor the folder of v1's split files (links
    followed), and either new, empty or made by this script (its manifest.json): another data
    set is never written over."""
    real = os.path.realpath(out)
    for d in map(os.path.realpath, sources):
        if os.path.commonpath([real, d]) == d:
            raise DataError(f"--out {out} is in the source {d}; the sources are never written "
                            "to: choose another folder")
    if real in [os.path.realpath(d) for d in split_dirs]:
        raise DataError(f"--out {out} is the folder of v1's split files: choose another")
    if os.path.isdir(real) and os.listdir(real) and not os.path.isfile(
            os.path.join(real, "manifest.json")):
        raise DataError(f"--out {out} holds files this script did not make (no manifest.json); "
                        "choose a new or empty folder")
    return real


def write_covidx(out, rows, link, manifest, cohen, kermany):
    """Films first (each kept when already there whole), then train.txt, test.txt and
    manifest.json, each replaced at once: a run killed anywhere leaves the old split files or
    the new ones, never one of each. Films an earlier run of this script put there and this
    one does not list are removed. Returns how many films were there already."""
    old = os.path.join(out, "manifest.json")
    made_before = set()
    if os.path.isfile(old):
        with open(old) as f:
            made_before = {(r["split"], r["file"]) for r in json.load(f)["films"]}
    manifest["films"], kept = [], 0
    for split, rs in rows.items():
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for pid, src, label, source in tqdm(rs, desc=f"writing {split}", unit="img", disable=None):
            dst = os.path.join(out, split, os.path.basename(src))
            digest = sha256(src)
            if os.path.isfile(dst) and sha256(dst) == digest:
                kept += 1  # there from an earlier run, whole
            else:
                place(src, dst, link)
            manifest["films"].append({
                "split": split, "file": os.path.basename(src), "patient": pid, "label": label,
                "source": source, "sha256": digest,
                "from": os.path.relpath(src, cohen if source == "cohen" else kermany)})
    for split, rs in rows.items():
        write_atomic(os.path.join(out, f"{split}.txt"), "".join(
            f"{pid} {os.path.basename(src)} {label} {source}\n" for pid, src, label, source in rs))
    manifest["counts"] = {s: {c: sum(r[2] == c for r in rs) for c in covidx.CLASSES}
                          for s, rs in rows.items()}
    write_atomic(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1))
    for split, name in made_before - {(f["split"], f["file"]) for f in manifest["films"]}:
        if os.path.isfile(os.path.join(out, split, name)):
            os.remove(os.path.join(out, split, name))
    return kept


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s --cohen DIR --kermany DIR --out DIR [flags below]")
    p.add_argument("--cohen", required=True, metavar="DIR",
                   help="covid-chestxray-dataset checkout (metadata.csv, images/) (required)")
    p.add_argument("--kermany", required=True, metavar="DIR",
                   help="chest_xray folder of Kaggle's chest-xray-pneumonia (train/, val/, "
                   "test/) (required)")
    p.add_argument("--covid-net", default="", metavar="DIR",
                   help="COVID-Net clone (or folder) with v1's split files: reproduce v1's "
                        "split exactly (default: none: v1's rules, a new patient split)")
    p.add_argument("--train-split", default="", metavar="FILE",
                   help="v1's train_split.txt, instead of --covid-net")
    p.add_argument("--test-split", default="", metavar="FILE",
                   help="v1's test_split.txt, instead of --covid-net")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the COVIDx folder to write (required)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the Cohen patient split (without split files)")
    p.add_argument("--link", default="copy", choices=["copy", "hardlink", "symlink"],
                   help="how films reach --out (links save space; never edit linked films)")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the data set without the listed films that are missing")
    return p


def main(argv=None):
    p = make_parser()
    a = p.parse_args(argv)
    if bool(a.train_split) != bool(a.test_split):
        p.error("give both --train-split and --test-split, or --covid-net")
    for flag, d in (("--cohen", a.cohen), ("--kermany", a.kermany)):
        if not os.path.isdir(d):
            raise DataError(f"{flag} {d}: no such folder")
    images = os.path.join(a.cohen, "images")
    if not os.path.isdir(images):
        raise DataError(f"--cohen {a.cohen}: no images/ folder; give the folder of a checkout "
                        "of github.com/ieee8023/covid-chestxray-dataset")
    files = ((a.train_split, a.test_split) if a.train_split else
             covidx.find_split_files(a.covid_net) if a.covid_net else None)
    out = check_out_folder(a.out, [a.cohen, a.kermany],
                           [os.path.dirname(os.path.abspath(f)) for f in files or ()])
    kermany = covidx.kermany_index(a.kermany)
    problems = Problems()
    meta_rows = covidx.read_metadata(a.cohen)  # read (and checked) in both modes
    if files:
        rows, missing = covidx.from_split_files(files, images, kermany, problems)
        rule = f"v1's split files: {files[0]}, {files[1]}"
    else:
        cohen = [(pid, os.path.join(images, f), lab, src)
                 for pid, f, lab, src in covidx.cohen_rows(meta_rows)]
        missing = {"cohen": [os.path.basename(r[1]) for r in cohen
                             if not os.path.isfile(r[1])], "kermany": []}
        cohen = covidx.split_cohen([r for r in cohen if os.path.isfile(r[1])], seed=a.seed)
        rows = {s: cohen[s] + k for s, k in covidx.kermany_rows(kermany).items()}
        rule = (f"v1's rules (create_COVIDx.ipynb at COVID-Net {covidx.V1_COMMIT}): PA views "
                f"of COVID-19, SARS, MERS, Streptococcus; 10% of Cohen patients to test, seed "
                f"{a.seed}; Kermany train+val -> train, test -> test")
    print(f"COVIDx v1 from {rule}\n" + count_table(rows))
    fix = {"cohen": "removed or renamed in covid-chestxray-dataset since March 2020: check out "
                    "its commit of 24 March 2020 (548bb58) or pass --allow-missing",
           "kermany": "not in this chest_xray copy: use Kaggle's chest-xray-pneumonia (5,856 "
                      "films; v1 took train/ and val/ as train) or pass --allow-missing"}
    lost, named = Problems(), "listed" if files else "metadata.csv's"
    for src, names in missing.items():
        lost.add(f"{named} {src} films not found", names, f" ({fix[src]})")
    if a.allow_missing:
        print("\n".join(f"warning: {m}" for m in lost) or "every listed film was found")
    else:
        problems += lost
    names = {}
    for split, rs in rows.items():  # two films of one name in a folder: one would be lost
        for r in rs:
            names.setdefault((split, os.path.basename(r[1])), []).append(r[1])
    problems.add("file names that two source films share", [
        f"{s}/{n}: {', '.join(ps)}" for (s, n), ps in names.items() if len(ps) > 1])
    problems.add("patient ids or file names that are empty or hold spaces (train.txt could not "
                 "be read back)", [f"{r[0]!r} {os.path.basename(r[1])!r}" for rs in rows.values()
                                   for r in rs if r[0].endswith("_") or
                                   len((r[0] + os.path.basename(r[1])).split()) != 1])
    check_rows(rows, covidx.CLASSES, problems, allow_patient_overlap=True)
    shared = {r[0] for r in rows["train"]} & {r[0] for r in rows["test"]}
    if shared:  # v1's own split files may have them: said, and left to train.py's check
        print(f"warning: {len(shared)} patients are in both splits (e.g. {sorted(shared)[0]}); "
              "train.py will stop unless --allow-patient-overlap")
    problems.add("films cannot be read", unreadable([r[1] for rs in rows.values() for r in rs]),
                 " (download them again)")
    problems.check()  # nothing is written before this line

    kept = write_covidx(out, rows, a.link, {
        "made_by": f"make_covidx_v1.py, git commit {git_commit()[:12]}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rule": rule,
        "sources": {"cohen": os.path.abspath(a.cohen),
                    "metadata.csv sha256": sha256(os.path.join(a.cohen, "metadata.csv")),
                    "kermany": os.path.abspath(a.kermany),
                    "split files": {os.path.abspath(f): sha256(f) for f in files or ()}},
        "missing": missing, "expected": covidx.EXPECTED}, a.cohen, a.kermany)
    print(f"wrote {out}: {sum(map(len, rows.values()))} films ({kept} already there), train.txt, "
          f"test.txt, manifest.json\nnext: python audit.py --data {a.out}; python train.py "
          f"--data {a.out}")
    return rows, missing


if __name__ == "__main__":
    run_cli(main)
