"""Audit a data set before training on it: duplicates, leaks between splits, sources, shortcuts.

    python audit.py --data ../shared/data/cxr-sample              # -> runs/audit-cxr-sample/
    python audit.py --data covidx-v1 --out audits/v1 --subtypes subtype.csv

What it finds, in any data set train.py reads:
  - the same file twice (SHA-256 of its bytes), and near-duplicates: the same picture resized,
    re-encoded, brightened, cropped a few percent or stored at another bit depth (a perceptual
    hash, confirmed by the films' detail: machinery/audit.py), within and across the splits;
  - patients in both splits, and one picture under two patient ids;
  - the sources of each class, with a warning when a class comes mostly from one source;
  - a shortcut baseline: a logistic regression on the file's metadata alone (size, aspect, bit
    depth, colour mode, format, mean and spread of intensity; then with the source too),
    cross-validated by patient. Accuracy well above chance means the labels can be told without
    looking at the lungs: a model may learn the hospital instead of the disease.
Writes audit.md, audit.json and duplicates.png (the pairs found, side by side) to --out.
train.py runs the cheap part, test films duplicated in training, at every start and refuses
to train on such a split unless --allow-duplicates is given.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from machinery import audit, datasets, films
from machinery.config import READING, Config
from machinery.flags import Help, add_flags
from machinery.shortcuts import sources_to_hold_out


def thumbs_of(items):
    """A split's films as the detector compares them (audit.thumbs of the squished films)."""
    return audit.thumbs(films.load_pixels(items, [audit.THUMB]).images[audit.THUMB])


def contact_sheet(path, pairs, tile=160):
    """pairs: [(label, path a, path b)] -> one PNG, a pair per row, captioned with how they
    match above and each film's file name below."""
    if not pairs:
        return None
    row = tile + 30
    sheet = Image.new("L", (2 * tile + 8, len(pairs) * row), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (label, a, b) in enumerate(pairs):
        y = r * row
        draw.text((2, y + 2), label[:2 * tile // 6], fill=0)
        for c, p in enumerate((a, b)):
            with Image.open(p) as img:
                img = films.to_gray(img)
                img.thumbnail((tile, tile))
            sheet.paste(img, (c * (tile + 8), y + 14))
            name = os.path.basename(p)  # its end, where names differ, when it is long
            draw.text((c * (tile + 8) + 2, y + 16 + tile), name if len(name) <= 26 else
                      "..." + name[-23:], fill=0)
    sheet.save(path)
    return path


def run_audit(classes, splits, th, near, exact):
    """The audit as a dict: splits {name: Items}, th {name: thumbnails}; near / exact: the
    pairs found by the near-duplicate search and by the files' SHA-256, {(split a, split b):
    [audit.Pair]}. Pairs are rows: same pixels (identical, at 64 px), same bytes or near."""
    out = {"classes": classes, "films": {s: len(it) for s, it in splits.items()},
           "duplicates": {}}
    for sa, sb in near:  # a pair found by both keeps the near search's numbers
        a, b = splits[sa], splits[sb]
        rows, same = {}, {(p.i, p.j) for p in exact[sa, sb]}
        for p in near[sa, sb] + exact[sa, sb]:
            rows.setdefault((p.i, p.j), {
                "a": a.paths[p.i], "b": b.paths[p.j], "patient_a": a.patients[p.i],
                "patient_b": b.patients[p.j], "hamming": p.hamming, "ncc": p.ncc,
                "identical": p.identical, "same_bytes": (p.i, p.j) in same})
        out["duplicates"][f"{sa}~{sb}"] = list(rows.values())
    rows = [r for rs in out["duplicates"].values() for r in rs]
    out["same_picture_two_patients"] = [r for r in rows if r["patient_a"] != r["patient_b"]]
    tr, te = splits["train"], splits["test"]
    out["patients_in_both_splits"] = sorted(set(tr.patients) & set(te.patients))
    both = datasets.Items(tr.paths + te.paths, tr.labels + te.labels, tr.patients + te.patients,
                          tr.sources + te.sources)
    out["sources"], out["source_warnings"] = audit.source_table(classes, both)
    x = audit.metadata(both.paths, torch.cat([th["train"], th["test"]]))
    out["shortcut"] = audit.shortcut_baseline(x, both.labels, both.patients, both.sources, classes)
    return out


def pct(sc, key):
    return f"{100 * sc[key]:.1f}% / {100 * sc['balanced_' + key]:.1f}%"


def summary(a):
    """The audit in a few lines: what train.py's report and tools/make_covidx_v1.py print."""
    found = [f"{k} {len(v)}" for k, v in a["duplicates"].items() if v]
    sc = a["shortcut"]
    lines = [f"films: {', '.join(f'{s} {k}' for s, k in a['films'].items())}",
             "duplicate pairs (exact or near): " + (", ".join(found) or "none"),
             f"patients in both splits: {len(a['patients_in_both_splits'])}; one picture under "
             f"two patient ids: {len(a['same_picture_two_patients'])}",
             "shortcut baseline (metadata alone, cross-validated by patient), accuracy / "
             f"balanced accuracy: {pct(sc, 'image_properties')} from image properties, "
             f"{pct(sc, 'with_source')} with the source; chance {pct(sc, 'chance')}",
             "  its recall per class, from image properties: " + ", ".join(
                 f"{c} {100 * r:.0f}%" for c, r in sc["recall_image_properties"].items())]
    lines += [f"warning: {w}" for w in a["source_warnings"]]
    return lines


def how(r):
    """How alike a pair is, in words."""
    if r["same_bytes"]:
        return "the same file"
    return "identical" if r["identical"] else f"hamming {r['hamming']}, detail {r['ncc']:.2f}"


def shortcut_tests(a, data):
    """audit.md's pointer from the shortcuts the files allow to whether a model takes them:
    the lungs hidden, a source held out (docs/data.md)."""
    held = sources_to_hold_out({s: r for s, r in a["sources"].items() if s != "(none)"})
    ok = [s for s, (lost, untested) in held.items() if not lost and not untested]
    partly = [f"{s} (with --allow-missing-class: its films test no {', '.join(untested)})"
              for s, (lost, untested) in held.items() if not lost and untested]
    lines = ["Whether a model trained on these films takes such shortcuts is measured by "
             "training it without the lungs (the border alone) and on the lungs alone, "
             "seeds paired, against the whole films and chance:", "",
             f"    python ablate.py --data {data} --preset shortcut --seeds 0,1,2"]
    if held:
        lines += ["", "and by testing on a source that never trained (`train.py --test-sources "
                  "NAME`): possible for " + (", ".join(ok + partly) or "none") + "".join(
                      f"; not for {s} ({', '.join(lost)} would have no training film)"
                      for s, (lost, _) in held.items() if lost) + "."]
    return lines


def write_md(path, a, sheet, data):
    text = ["# Data audit", "", *[f"- {s}" for s in summary(a)], "", "## Sources by class", "",
            *audit.sources_md(a["sources"], a["classes"]), "", "## Shortcut tests", "",
            *shortcut_tests(a, data), "", "## Duplicate pairs", ""]
    for key, rows in a["duplicates"].items():
        cut = " (the first 200 here; all in audit.json)" if len(rows) > 200 else ""
        text += [f"### {key}: {len(rows)}{cut}", ""] + [
            f"- `{r['a']}` ~ `{r['b']}` ({how(r)}; patients {r['patient_a']} / "
            f"{r['patient_b']})" for r in rows[:200]] + [""]
    if sheet:
        text += ["![duplicate pairs](duplicates.png)", ""]
    text += ["## Timing (seconds)", "", "```", json.dumps(a["seconds"], indent=1), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(text))


COPIES = ["resize 50%", "JPEG q50", "crop 2%", "crop 4%", "brighter", "16-bit PNG"]


def copy_of(img, kind, rng):
    """A copy of the PIL film `img` as data sets make them: (PIL image, format)."""
    w, h = img.size
    if kind == "resize 50%":
        return img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), "PNG"
    if kind == "JPEG q50":
        return img, "JPEG50"
    if kind.startswith("crop"):  # up to f of each side, drawn per side: shifts and stretches
        f = int(kind[5:-1]) / 100
        left, top, right, bottom = (int(s * f * rng.random()) for s in (w, h, w, h))
        return img.crop((left, top, w - right, h - bottom)), "PNG"
    a = np.asarray(img, dtype=np.float32)
    if kind == "brighter":
        return Image.fromarray((a * 1.15 + 12).clip(0, 255).astype(np.uint8)), "PNG"
    return Image.fromarray((a * 257 + 100).astype(np.int32)).convert("I;16"), "PNG"


def measure(items, tmp):
    """The detector on copies of each film (COPIES) and on the distinct films -> dict: the
    recall of each kind of copy, the false pairs among films of different patients, times."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    th = thumbs_of(items)
    t1 = time.perf_counter()
    within = audit.near_duplicates(th)
    t2 = time.perf_counter()
    n_diff = sum(items.patients[i] != items.patients[j] for i in range(len(th))
                 for j in range(i + 1, len(th)))
    false = [p for p in within if items.patients[p.i] != items.patients[p.j]]
    out = {"films": len(th), "distinct_pairs": n_diff, "false_pairs": len(false),
           "false_pair_rate": len(false) / max(n_diff, 1),
           "same_patient_pairs_found": len(within) - len(false), "recall": {},
           "seconds_per_1000_films_decode_and_hash": round((t1 - t0) * 1000 / len(th), 2),
           f"seconds_pairs_within_{len(th)}_films": round(t2 - t1, 2)}
    for kind in COPIES:
        paths = []
        for k, src in enumerate(items.paths):
            with Image.open(src) as img:
                img, fmt = copy_of(films.to_gray(img), kind, rng)
            paths.append(os.path.join(tmp, f"{k}.{'jpg' if fmt == 'JPEG50' else 'png'}"))
            img.save(paths[-1], **({"quality": 50} if fmt == "JPEG50" else {}))
        copies = datasets.Items(paths, items.labels, items.patients, items.sources)
        found = {(p.i, p.j) for p in audit.near_duplicates(th, thumbs_of(copies))}
        out["recall"][kind] = round(sum((i, i) in found for i in range(len(th))) / len(th), 4)
    return out


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s --data PATH [flags below]")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="COVIDx or ImageFolder root (required)")
    add_flags(p, Config, READING, grouped=False)  # train.py's, as it reads the data
    p.add_argument("--out", default="", metavar="DIR",
                   help="output folder (default: runs/audit-<data>/)")
    p.add_argument("--pairs", type=int, default=24, metavar="N",
                   help="pairs shown in duplicates.png")
    p.add_argument("--measure", action="store_true",
                   help="measure the near-duplicate detector instead, on copies of the train "
                        "split's films (resized, re-encoded, cropped, brighter, 16-bit) and on "
                        "its distinct films; writes detector.json")
    return p


def main(argv=None):
    a = make_parser().parse_args(argv)
    t = {"start": time.perf_counter()}
    problems = datasets.Problems()  # overlap and missing classes are findings here, not errors
    classes, splits = datasets.load_dataset(a.data, a.train_split, a.test_split, a.image_dir,
                                            a.subtypes, 0, 0, True, True, problems)
    if splits["train"].pixels is not None:
        raise datasets.DataError("--data phantom: the audit reads files; give a data set")
    out = a.out or os.path.join("runs", "audit-" + os.path.basename(os.path.normpath(a.data)))
    if a.measure:
        problems.check()
        with tempfile.TemporaryDirectory() as tmp:
            m = measure(splits["train"], tmp)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "detector.json"), "w") as f:
            json.dump(m, f, indent=1)
        print(json.dumps(m, indent=1))
        return m
    decoded = {s: films.load_pixels(it, [audit.THUMB], a.cache_dir or None, "squish",
                                    problems=problems) for s, it in splits.items()}
    problems.check()  # before the thumbnails: load_pixels gives None when a film is unreadable
    os.makedirs(out, exist_ok=True)
    th = {s: audit.thumbs(f.images[audit.THUMB]) for s, f in decoded.items()}
    t["decode"] = time.perf_counter()
    digests = {s: [audit.sha256(p) for p in it.paths] for s, it in splits.items()}
    t["sha256"] = time.perf_counter()
    near, exact = {}, {}
    for sa, sb in [("train", "train"), ("test", "test"), ("test", "train")]:
        near[sa, sb] = audit.near_duplicates(th[sa], None if sa == sb else th[sb])
        where = {}
        for j, d in enumerate(digests[sb]):
            where.setdefault(d, []).append(j)
        exact[sa, sb] = [audit.Pair(i, j, 0, 1.0, True) for i, d in enumerate(digests[sa])
                         for j in where.get(d, []) if sa != sb or j > i]
    t["pairs"] = time.perf_counter()
    result = run_audit(classes, splits, th, near, exact)
    t["shortcut"] = time.perf_counter()
    n = sum(len(it) for it in splits.values())
    steps = list(t)
    result["seconds"] = {k: round(t[k] - t[prev], 2) for prev, k in zip(steps, steps[1:])}
    result["seconds"]["per_1000_films"] = round((t["shortcut"] - t["start"]) * 1000 / n, 2)
    rows = [r for rs in result["duplicates"].values() for r in rs][:a.pairs]
    png = os.path.join(out, "duplicates.png")
    if os.path.isfile(png):  # an earlier audit's
        os.remove(png)
    sheet = contact_sheet(png, [(how(r), r["a"], r["b"]) for r in rows])
    with open(os.path.join(out, "audit.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_md(os.path.join(out, "audit.md"), result, sheet, a.data)
    print("\n".join(summary(result)))
    print(f"wrote {out}/audit.md, audit.json" + (", duplicates.png" if sheet else ""))
    return result


if __name__ == "__main__":
    datasets.run_cli(main)
