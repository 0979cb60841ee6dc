"""Compare training runs honestly: groups of seeds, intervals, and paired tests on one test set.

    python compare.py runs/a-s0 runs/a-s1 runs/b-s0 runs/b-s1        # grouped by what differs
    python compare.py runs/*/ --group-by arch --ref resnet50 --out cmp/

Runs are grouped by the config values that differ between them (seed and run-folder names
aside), or by --group-by. Per group: how many runs (seeds), test accuracy, balanced accuracy,
macro-F1 and each class's sensitivity as mean ± sd with the 95% t-interval of the mean
(clipped to 0-100%), and the run's own wall time. Against the reference group (--ref,
default the first): the difference in accuracy with a paired bootstrap 95% interval over test
images (images resampled, each image's correctness averaged over the group's seeds), and, for
two single runs, McNemar's exact test. Chance, for scale: always answering the test set's
largest class (its share is that accuracy; balanced accuracy 1/k for k classes).
Runs on different test sets (other files or labels) or class lists are refused.
Writes compare.md, compare.csv, compare.json and compare.png to --out (default: compare/ in
the folder that holds the runs: runs/compare/ for runs/a, runs/b).
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import random
from collections import Counter

from machinery import config, runlock
from machinery.config import Config
from machinery.flags import Help
from machinery.datasets import DataError
from machinery.plots import dot_plot

IGNORED = config.BOOKKEEPING  # not what sets a group apart
DEFAULTS = dataclasses.asdict(Config())  # for keys that older runs' config.json lack
# Student's t, 97.5th percentile, for 1..30 degrees of freedom (then a series in 1/df)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


class CompareError(ValueError):
    """The runs cannot be compared as given; the message says why."""


def t975(df):
    if df <= 30:
        return T975[df - 1]
    z = 1.959964  # Cornish-Fisher: within 1e-4 of the exact value beyond 30
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def summary(values, bounds=(0.0, 1.0)):
    """{n, mean, sd, lo, hi}: the 95% t-interval of the mean (none for one value), clipped to
    the values' possible range `bounds` (proportions: [0, 1]; None: not clipped)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n, nan = len(values), float("nan")
    mean = sum(values) / n if n else nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else nan
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else nan
    lo, hi = mean - half, mean + half
    if bounds and n > 1:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return {"n": n, "mean": mean, "sd": sd, "lo": lo, "hi": hi}


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p: b, c the discordant pairs (the first right and the second
    wrong, and the other way round), a binomial(b + c, 1/2) test."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_bootstrap(correct_a, correct_b, n_boot=2000, seed=0):
    """95% interval of mean(a - b) over images resampled with replacement: a and b each
    image's correctness (averaged over seeds) in two groups, on the same images. It holds the
    trained models fixed: it says how much the test set's sampling could move the difference,
    not how much retraining with other seeds would (welch() says that)."""
    d = [x - y for x, y in zip(correct_a, correct_b)]
    n, rng = len(d), random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return means[round(0.025 * (n_boot - 1))], means[round(0.975 * (n_boot - 1))]


def welch(a, b):
    """95% Welch t-interval of mean(a) - mean(b) over runs (seeds): retraining's variation.
    None unless both groups have two runs or more."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = summary(a, None), summary(b, None)
    va, vb = sa["sd"] ** 2 / len(a), sb["sd"] ** 2 / len(b)
    d = sa["mean"] - sb["mean"]
    if va + vb == 0:
        return d, d
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t975(max(1, math.floor(df))) * math.sqrt(va + vb)
    return d - half, d + half


def load_run(path):
    """One finished run folder: its config, test metrics and per-image predictions."""
    if os.path.isfile(os.path.join(path, "lrfind.json")):
        raise CompareError(f"{path}: an LR finder's folder (lrfind.py), not a training run")
    try:
        runlock.check_not_written(path)
    except DataError as e:  # a run still training
        raise CompareError(str(e)) from e
    need = ["config.json", "test_metrics.json", "test_predictions.csv"]
    missing = [f for f in need if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CompareError(f"{path}: not a finished run (no {', '.join(missing)})")
    cfg = {**DEFAULTS, **json.load(open(os.path.join(path, "config.json")))}
    cfg["data"] = os.path.normpath(cfg["data"])
    m = json.load(open(os.path.join(path, "test_metrics.json")))
    with open(os.path.join(path, "test_predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    # an image is its file below the data's root (wherever that root was), or, for phantoms
    # (no file), its patient and place in the split
    root = cfg.get("image_dir") or cfg["data"]
    keys = [(os.path.relpath(r["path"], root) if r["path"].startswith(root) else r["path"])
            if r["path"] else f"{r['patient']}#{i}" for i, r in enumerate(rows)]
    return {"dir": path, "config": cfg, "metrics": m, "classes": m["classes"],
            "truth": dict(zip(keys, (r["label"] for r in rows))),
            "correct": dict(zip(keys, (r["label"] == r["predicted"] for r in rows)))}


def check_same_test_set(runs):
    first = runs[0]
    for r in runs[1:]:
        if r["classes"] != first["classes"]:
            raise CompareError(f"{r['dir']} has the classes {r['classes']}, {first['dir']} "
                               f"{first['classes']}: runs with other class lists cannot be "
                               "compared")
        if r["truth"] != first["truth"]:
            only = set(r["truth"]) ^ set(first["truth"])
            what = "the same images carry other labels"
            if only:
                what = f"{len(only)} images are in one test set only (e.g. {sorted(only)[0]})"
            elif r["config"]["data"] == "phantom":
                what += " (phantoms: another --phantom-seed or --phantoms)"
            raise CompareError(f"{r['dir']} and {first['dir']} were tested on different test "
                               f"sets: {what}. Compare runs on one test set")


def chance(truth):
    """What a model that learned nothing scores on this test set: always its largest class.
    truth: {image: label}."""
    counts = Counter(truth.values())
    largest = max(sorted(counts), key=counts.get)
    return {"always": largest, "accuracy": counts[largest] / len(truth),
            "balanced_accuracy": 1 / len(counts)}


def group_runs(runs, group_by=None):
    """{label: [runs]}, in the order first seen. The label names the config values that set
    the group apart (all of --group-by's keys, or every key that differs among the runs)."""
    if group_by:
        unknown = [k for k in group_by if k not in runs[0]["config"]]
        if unknown:
            raise CompareError(f"--group-by {','.join(unknown)}: not a config key (e.g. "
                               f"{', '.join(sorted(runs[0]['config'])[:6])}...)")
    else:
        all_keys = sorted({k for r in runs for k in r["config"]} - IGNORED)
        group_by = [k for k in all_keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1]
    groups = {}
    for r in runs:
        label = ", ".join(f"{k}={r['config'].get(k)}" for k in group_by) or "all"
        groups.setdefault(label, []).append(r)
    return groups


def accuracy(run):
    return run["metrics"]["accuracy"]["value"]


def compare(groups, ref=None, n_boot=2000, seed=0):
    """groups: {name: [run folder or loaded run, ...]} -> one result row per group."""
    groups = {g: [r if isinstance(r, dict) else load_run(r) for r in rs]
              for g, rs in groups.items()}
    runs = [r for rs in groups.values() for r in rs]
    if not runs:
        raise CompareError("no runs to compare")
    check_same_test_set(runs)
    ref = ref or next(iter(groups))
    if ref not in groups:  # one of a group's values (resnet50), or a unique part of its name
        parts = {g: [p for kv in g.split(", ") for p in (kv, kv.split("=", 1)[-1])] for g in groups}
        hits = [g for g in groups if ref in parts[g]] or [g for g in groups if ref in g]
        if len(hits) != 1:
            raise CompareError(f"--ref {ref}: {'no' if not hits else 'more than one'} group "
                               f"matches (groups: {'; '.join(groups)})")
        ref = hits[0]
    images, classes = list(runs[0]["truth"]), runs[0]["classes"]

    def per_image(rs):  # each image's correctness, averaged over the group's runs
        return [sum(r["correct"][k] for r in rs) / len(rs) for k in images]
    ref_correct = per_image(groups[ref])
    base = chance(runs[0]["truth"])
    rows = []
    for name, rs in groups.items():
        row = {"group": name, "runs": [r["dir"] for r in rs]}
        row["accuracy"] = summary([accuracy(r) for r in rs])
        row["balanced_accuracy"] = summary([r["metrics"]["balanced_accuracy"] for r in rs])
        row["macro_f1"] = summary([r["metrics"]["macro_f1"] for r in rs])
        row["chance"] = dict(base, accuracy_above=row["accuracy"]["mean"] - base["accuracy"])
        for c in classes:  # None where a class had no test images (--allow-missing-class)
            row[f"sensitivity_{c}"] = summary([
                r["metrics"]["per_class"][c]["sensitivity"]["value"] for r in rs])
        row["wall_s"] = summary([r["metrics"].get("timings_s", {}).get("total", float("nan"))
                                 for r in rs], None)
        if name != ref:
            mine = per_image(rs)
            diff = sum(mine) / len(mine) - sum(ref_correct) / len(ref_correct)
            lo, hi = paired_bootstrap(mine, ref_correct, n_boot, seed)
            v = row["vs_ref"] = {"ref": ref, "diff": diff, "lo": lo, "hi": hi}
            w = welch([accuracy(r) for r in rs], [accuracy(r) for r in groups[ref]])
            if w:
                v["welch_lo"], v["welch_hi"] = w
            if len(rs) == 1 and len(groups[ref]) == 1:  # each image's correctness is 0 or 1
                b = sum(x > y for x, y in zip(mine, ref_correct))  # right here, wrong in ref
                c = sum(x < y for x, y in zip(mine, ref_correct))
                v["mcnemar"] = {"b": b, "c": c, "p": mcnemar_exact(b, c)}
        rows.append(row)
    return rows


def _no_nan(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return [_no_nan(v) for v in x] if isinstance(x, list) else x


def pct(s):
    """mean ± sd [lo, hi] in percent (one run: its value alone)."""
    if s["n"] <= 1:
        return f"{100 * s['mean']:.1f}" if s["n"] else "-"
    return (f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f} "
            f"[{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]")


def table(rows, classes):
    """The comparison as a markdown table, and a second one of the differences."""
    head = ["group", "n", "accuracy %", "above chance", "balanced acc. %", "macro-F1 %"] + \
        [f"sens. {c} %" for c in classes] + ["wall s"]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["group"], str(r["accuracy"]["n"]), pct(r["accuracy"]),
                 f"{100 * r['chance']['accuracy_above']:+.1f}",
                 pct(r["balanced_accuracy"]), pct(r["macro_f1"])] + \
            [pct(r[f"sensitivity_{c}"]) for c in classes] + [f"{r['wall_s']['mean']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    c = rows[0]["chance"]
    out.append(f"| chance: always {c['always']} | | {100 * c['accuracy']:.1f} | | "
               f"{100 * c['balanced_accuracy']:.1f} | | " + " | ".join(
                   "100.0" if k == c["always"] else "0.0" for k in classes) + " | |")
    diffs = [r for r in rows if "vs_ref" in r]
    if diffs:
        ref = diffs[0]["vs_ref"]["ref"]
        out += ["", f"Accuracy minus `{ref}`'s, in points. Test images: a paired bootstrap "
                "over the test images, the models as trained (how much the test set's sampling "
                "could move the difference). Seeds: Welch's t-interval over the runs' "
                "accuracies (how much retraining could). McNemar: b = images this group got "
                "right and the reference wrong, c = the reverse (two single runs only).", "",
                "| group | difference | 95%, test images | 95%, seeds | McNemar |",
                "|---|---|---|---|---|"]
        for r in diffs:
            v = r["vs_ref"]
            mc = v.get("mcnemar")
            mc = f"b={mc['b']}, c={mc['c']}, exact p={mc['p']:.3g}" if mc else "-"
            seeds = f"[{100 * v['welch_lo']:+.1f}, {100 * v['welch_hi']:+.1f}]" \
                if "welch_lo" in v else "-"
            out.append(f"| {r['group']} | {100 * v['diff']:+.1f} | "
                       f"[{100 * v['lo']:+.1f}, {100 * v['hi']:+.1f}] | {seeds} | {mc} |")
    return "\n".join(out)


def write_csv(path, rows, classes):
    cols = ["accuracy", "balanced_accuracy", "macro_f1"] + \
        [f"sensitivity_{c}" for c in classes] + ["wall_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n"] + [f"{c}_{s}" for c in cols for s in ("mean", "sd", "lo", "hi")]
                   + ["acc_diff_vs_ref", "acc_diff_lo", "acc_diff_hi", "mcnemar_p",
                      "chance_accuracy", "accuracy_above_chance"])
        for r in rows:
            v = r.get("vs_ref", {})
            w.writerow([r["group"], r["accuracy"]["n"]] +
                       [f"{r[c][s]:.6g}" for c in cols for s in ("mean", "sd", "lo", "hi")] +
                       [f"{v[k]:.6g}" if k in v else "" for k in ("diff", "lo", "hi")] +
                       [f"{v['mcnemar']['p']:.6g}" if "mcnemar" in v else ""] +
                       [f"{r['chance'][k]:.6g}" for k in ("accuracy", "accuracy_above")])


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s RUN [RUN ...] [flags below]")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders")
    p.add_argument("--group-by", default="", metavar="KEY,..", help="config keys that make a "
                   "group, comma separated (default: every key whose value differs between the "
                   "runs)")
    p.add_argument("--ref", default="", metavar="GROUP", help="reference group, or a part of "
                   "its name found in no other (default: the first)")
    p.add_argument("--out", default="", metavar="DIR", help="folder for compare.md, .csv, "
                   ".json and .png (default: compare/ in the runs' common folder)")
    p.add_argument("--boot", type=int, default=2000, metavar="N", help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the bootstrap")
    p.add_argument("--strict", action="store_true",
                   help="refuse a folder that is not a finished run (default: skip it, noted)")
    return p


def main(argv=None):
    a = make_parser().parse_args(argv)
    try:
        runs = []
        for r in a.runs:  # `runs/*/` also matches running, killed and LR-finder folders
            try:
                runs.append(load_run(r))
            except CompareError as e:
                if a.strict:
                    raise
                print(f"skipped {e}")
        if not runs:
            raise CompareError("no finished run among " + ", ".join(a.runs))
        groups = group_runs(runs, [k for k in a.group_by.split(",") if k])
        out = a.out or os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(
            r["dir"].rstrip(os.sep))) for r in runs]), "compare")
        try:
            return report(groups, out, a.ref or None, a.boot, a.seed)
        except OSError as e:  # the runs' common folder, or --out, cannot be written
            raise CompareError(f"cannot write {out} ({e.strerror or e}); give --out DIR") from e
    except CompareError as e:
        raise SystemExit(f"error: {e}")


def report(groups, out, ref=None, n_boot=2000, seed=0, title=""):
    """compare() the groups ({name: [run folders]}), print the tables, write compare.md, .csv,
    .json and .png to out; return the rows."""
    seen, once = set(), {}  # a run given twice would count twice
    for g, rs in groups.items():
        for x in rs:
            r = x if isinstance(x, dict) else load_run(x)
            if os.path.realpath(r["dir"]) not in seen:
                seen.add(os.path.realpath(r["dir"]))
                once.setdefault(g, []).append(r)
    groups = once
    notes = [f"group {g} mixes code versions ({k}: {', '.join(sorted(vals))}): its runs may "
             "differ by more than their seeds" for g, rs in groups.items()
             for k in ("git_commit", "torch")
             if len(vals := {str(r["config"].get(k)) for r in rs}) > 1]
    rows = compare(groups, ref, n_boot, seed)
    first = next(iter(groups.values()))[0]
    classes = first["classes"]
    head = f"{len(first['truth'])} images; mean ± sd over runs [95% t-interval of the mean]"
    text = table(rows, classes) + "".join(f"\n\nNote: {note}." for note in notes)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(f"# {title or 'Comparison'}\n\nTest set: {head}.\n\n{text}\n\n"
                "![accuracy per run](compare.png)\n")
    write_csv(os.path.join(out, "compare.csv"), rows, classes)
    dot_plot(os.path.join(out, "compare.png"),
             [(r["group"], [accuracy(x) for x in groups[r["group"]]],
               r["accuracy"]["mean"], r["accuracy"]["lo"], r["accuracy"]["hi"]) for r in rows],
             "test accuracy per run", percent=True)
    with open(os.path.join(out, "compare.json"), "w") as f:  # strict JSON: null, not NaN
        json.dump(_no_nan(rows), f, indent=1)
    print(f"test set: {head}\n\n{text}\n\nwritten to {out}/compare.md, .csv, .json, .png")
    return rows


if __name__ == "__main__":
    main()
