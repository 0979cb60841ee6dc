"""One page per training run: runs/<name>/report.md with its plots, made from the run's files.

    write_outputs(run, metrics, probs)  # train.py, at the end: test files, then report.md
    write_report("runs/NAME")           # report.md again (python report.py runs/NAME)

Reads config.json, metrics.jsonl, the LR-finder curves, test_metrics.json and
test_predictions.csv; writes loss.png and accuracy.png (per epoch), confusion_matrix.png,
roc.png and report.md, which shows them with the stage table and the test metrics.
"""
import csv
import json
import os
import time
from itertools import groupby
from operator import itemgetter

from machinery import ddp, runlock
from machinery.audit import sources_md
from machinery.checkpoint import drop_last
from machinery.metrics import classification_metrics, format_metrics, roc_curve
from machinery.modelcard import phantom_data, write_model_card
from machinery.plots import COLOURS, GREY, LIGHT, confusion_plot, line_plot
from machinery.shortcuts import NOT_A_CLASSIFIER, Hidden
from model import GROUPS
from schedule import ONE_CYCLE

EPOCHS = "epoch (all phases in order)"  # the x axis of every plot per epoch


def write_predictions(path, items, labels, probs, classes):
    """predictions CSV: path, patient, source, label, prediction, class probabilities.

    labels are class indices into `classes` (the model's), probs a list of rows."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient", "source", "label", "predicted"] +
                   [f"p_{c}" for c in classes])
        for k, pr in enumerate(probs):
            top = max(range(len(pr)), key=pr.__getitem__)
            w.writerow([items.paths[k] or "", items.patients[k], items.sources[k],
                        classes[labels[k]], classes[top]] + [f"{v:.6f}" for v in pr])


def roc_plot(path, probs, labels, classes, per_class):
    """One-vs-rest ROC curve of every class, with its AUC from the metrics, and chance."""
    series = []
    for i, c in enumerate(classes):
        fpr, tpr = roc_curve([pr[i] for pr in probs], [y == i for y in labels])
        auc = per_class[c].get("roc_auc")
        series.append((fpr, tpr, f"{c} (AUC {'n/a' if auc is None else f'{auc:.3f}'})"))
    line_plot(path, series + [([0, 1], [0, 1], "chance")], "false positive rate",
              "true positive rate", title="ROC, each class against the rest",
              colours=COLOURS[:len(series)] + [GREY], legend_at="bottom")


def stage_table(rows):
    """Markdown table: one line per phase, from the per-epoch rows of metrics.jsonl."""
    phases = {}
    for r in rows:
        phases.setdefault(r["phase"], []).append(r)
    lines = ["| phase | epochs | max LR per group | train loss | val loss | val acc | time s |",
             "|---|---|---|---|---|---|---|"]
    for tag, rs in phases.items():
        last = rs[-1]
        lrs = " / ".join(f"{lr:.1e}" for lr in last.get("max_lrs", [last["lr"]]))
        lines.append(f"| {tag} | {len(rs)} | {lrs} | {last['train_loss']:.4f} | "
                     f"{last['val_loss']:.4f} | {100 * last['val_acc']:.1f}% | "
                     f"{sum(r['time'] for r in rs):.1f} |")
    return "\n".join(lines)


def schedule_plots(run_dir, rows, cfg, bands, points=50):
    """lr_schedule.png and momentum.png: each layer group's LR and Adam's beta1 across the run
    as fit() set them (fastai's plot_lr), `points` per epoch, from schedule.py with each
    phase's max LRs in metrics.jsonl. Returns what they draw: (epochs, [(epochs, LRs, layer
    groups)], beta1s); groups with the same LRs are one series, named by all of them."""
    one_cycle = ONE_CYCLE[cfg.get("one_cycle", "v1")]
    phases = [list(rs) for _, rs in groupby(rows, key=itemgetter("phase"))]  # each phase's epochs
    n_groups = max(len(rs[0]["max_lrs"]) for rs in phases)
    xs, lrs, moms, first = [], [[] for _ in range(n_groups)], [], 0
    for rs in phases:
        total = len(rs) * points
        for k in range(total):
            xs.append(first + 0.5 + k / points)
            for g, lr_max in enumerate(rs[0]["max_lrs"]):
                lr, beta1 = one_cycle(k, total, lr_max, cfg["pct_start"], cfg["div"],
                                      cfg["div_final"])
                lrs[g].append(lr)
            moms.append(beta1)
        first += len(rs)
    # groups with the same LRs (fastai's slice(lr): every body group lr/10) draw one line
    names = GROUPS if n_groups == len(GROUPS) else [f"group {g + 1}" for g in range(n_groups)]
    series = [(xs, ys, " and ".join(names[h] for h in range(g, n_groups) if lrs[h] == ys))
              for g, ys in enumerate(lrs) if ys not in lrs[:g]]  # drawn with the first
    line_plot(os.path.join(run_dir, "lr_schedule.png"), series, EPOCHS,
              "learning rate (log axis)", title="LR of each layer group (one-cycle per phase)",
              logy=True, bands=bands, legend_at="bottom")
    line_plot(os.path.join(run_dir, "momentum.png"), [(xs, moms, "beta1")], EPOCHS,
              "Adam's beta1", title="momentum (one-cycle)", bands=bands)
    return xs, series, moms


def step_series(path):
    """steps.csv -> [(x, losses, label)]: each step at its place within its epoch (epoch n
    spans n - 0.5 .. n + 0.5), or [] when the run kept none."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        steps = [(int(r["epoch"]), int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    per_epoch = {}
    for n, k, _ in steps:
        per_epoch[n] = max(per_epoch.get(n, 0), k)
    xs = [n - 0.5 + (k - 0.5) / per_epoch[n] for n, k, _ in steps]
    return [(xs, [loss for *_, loss in steps], "train loss per step")] if steps else []


def phase_bands(rows):
    """[(first epoch - 0.5, last epoch + 0.5, 's1 head')]: each run of epochs of one phase."""
    bands = []
    for n, r in enumerate(rows, 1):
        name = f"s{r['stage'] + 1} " + ("head" if r.get("phase_name") == "frozen" else "all")
        if bands and bands[-1][2] == name:
            bands[-1] = (bands[-1][0], n + 0.5, name)
        else:
            bands.append((n - 0.5, n + 0.5, name))
    return bands


def most_confused(cm, classes, top=5):
    """fastai's most_confused: the largest off-diagonal cells, as lines for report.md."""
    pairs = sorted(((cm[i][j], classes[i], classes[j], sum(cm[i])) for i in range(len(cm))
                    for j in range(len(cm)) if i != j and cm[i][j]), reverse=True)[:top]
    if not pairs:
        return ["No test film was confused with another class.", ""]
    return ["Most confused (true -> predicted: films, share of the true class):", ""] + [
        f"- {a} -> {b}: {n} ({100 * n / total:.0f}%)" for n, a, b, total in pairs] + [""]


def data_lines(path, classes, cfg, m):
    """What the run trained on: phantoms in words; else what the audit at the start
    (audit.leaks) found: test films duplicated in training, and the sources of each class."""
    tested = "Test split: " + ", ".join(f"{c} {sum(row)}" for c, row in
                                        zip(classes, m["confusion_matrix"])) + "."
    if cfg.get("data") == "phantom":
        return [phantom_data(cfg) + ".", "", tested, ""]
    if not os.path.isfile(path):  # films written from phantoms (bench.py): no audit
        return [f"Data `{cfg['data']}`: no duplicate check ran at the start (phantom films "
                "each drawn from its own seed, or a run from before 2026-11-28).", "", tested,
                ""]
    with open(path) as f:
        leaks = json.load(f)
    n = leaks["test_films_with_duplicate_in_train"]
    if not n:
        lines = ["No test film has an exact or near duplicate in training (checked at the start "
                 "of the run; `python audit.py --data ...` for the whole audit)."]
    else:
        lines = [f"**{n} test films have an exact or near duplicate in training** (trained "
                 "with --allow-duplicates): the test metrics below are inflated by them:", ""]
        lines += [f"- `{line}`" for line in leaks["films"][:20]]
    if leaks.get("val_films_with_duplicate_in_train"):
        lines += ["", f"{leaks['val_films_with_duplicate_in_train']} validation films have an "
                  "exact or near duplicate in training: the validation numbers per epoch are "
                  "inflated by them."]
    lines += ["", *sources_md(leaks["sources"], classes)]
    lines += [""] + [f"Warning: {w}." for w in leaks["source_warnings"]] + [""]
    # audit.py's report of this data set, where audit.py puts it by default: beside the run
    name = "audit-" + os.path.basename(os.path.normpath(cfg["data"]))
    if os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(path)), name, "audit.md")):
        lines += [f"The data set's audit (audit.py: every duplicate pair, sources, the "
                  f"shortcut baseline): [../{name}/audit.md](../{name}/audit.md).", ""]
    return lines


def shortcut_lines(cfg):
    """report.md's warning that a run is a shortcut test (--hide), and what its test split
    holds out (--test-sources)."""
    lines, hidden = [], Hidden.of(cfg)
    if hidden:
        lines += [f"**Trained and tested on {hidden.note()}: {NOT_A_CLASSIFIER}.**", ""]
    if cfg.get("test_sources"):
        lines += [f"Test split: the films of the sources {cfg['test_sources']}, none of which "
                  "trained (--test-sources).", ""]
    return lines


def write_report(run_dir):
    """Write the plots and report.md into run_dir; return the report's path."""
    p = lambda name: os.path.join(run_dir, name)
    cfg = json.load(open(p("config.json")))
    rows = [json.loads(line) for line in open(p("metrics.jsonl")) if line.strip()]
    m = json.load(open(p("test_metrics.json")))
    epochs = list(range(1, len(rows) + 1))
    bands = phase_bands(rows)
    steps = step_series(p("steps.csv"))
    line_plot(p("loss.png"), [*steps, (epochs, [r["train_loss"] for r in rows], "train loss"),
                              (epochs, [r["val_loss"] for r in rows], "validation loss")],
              EPOCHS, "cross-entropy loss (log axis)",
              title="loss per epoch" + (" and per training step" if steps else ""),
              logy=True, bands=bands, colours=[LIGHT, *COLOURS] if steps else COLOURS)
    line_plot(p("accuracy.png"), [(epochs, [100 * r["val_acc"] for r in rows], "validation")],
              EPOCHS, "accuracy %", title="validation accuracy per epoch", bands=bands)
    if rows and all("max_lrs" in r for r in rows):
        schedule_plots(run_dir, rows, cfg, bands)
    confusion_plot(p("confusion_matrix.png"), m["confusion_matrix"], m["classes"],
                   f"test split, {m['n']} images")
    with open(p("test_predictions.csv"), newline="") as f:
        preds = list(csv.DictReader(f))
    roc_plot(p("roc.png"), [[float(r["p_" + c]) for c in m["classes"]] for r in preds],
             [m["classes"].index(r["label"]) for r in preds], m["classes"], m["per_class"])

    lrfinds = sorted(f for f in os.listdir(run_dir) if f.startswith("lrfind_") and
                     f.endswith(".png"))
    text = [f"# Run {os.path.basename(os.path.normpath(run_dir))}", "",
            f"Data `{cfg['data']}`, {cfg['arch']} with weights `{cfg['weights']}`, stages "
            f"{cfg['stages']} px, device {cfg.get('device', '?')}, torch {cfg.get('torch', '?')}, "
            f"git commit `{cfg.get('git_commit', '?')[:12]}`, seed {cfg['seed']}.", "",
            *shortcut_lines(cfg), "## Stages", "", stage_table(rows), "",
            "![loss per epoch](loss.png) ![accuracy per epoch](accuracy.png)", "",
            "![LR of each layer group](lr_schedule.png) ![momentum](momentum.png)", "",
            "## LR range tests", "",
            "Each phase's sweep; the red circle marks the learning rate taken.", ""]
    text += [f"![{f[7:-4]}]({f})" for f in lrfinds] or ["(no phase used `auto`)"]
    text += ["", "## Data", "", *data_lines(p("leaks.json"), m["classes"], cfg, m),
             "## Test split", "", "```", format_metrics(m), "```", "",
             *most_confused(m["confusion_matrix"], m["classes"]),
             "![confusion matrix](confusion_matrix.png) ![ROC curves](roc.png)", "",
             *(["![top losses](top_losses.png)", ""] if os.path.isfile(p("top_losses.png"))
               else []),
             "## Config", "", "```json", json.dumps(cfg, indent=1), "```", ""]
    with open(p("report.md"), "w") as f:
        f.write("\n".join(text))
    return p("report.md")


def test_metrics(run, probs):
    """The test split's metrics (classification_metrics: with intervals, per source) from its
    probabilities, with the run's timings; under torchrun whether every rank held rank 0's
    model (every rank calls this: ddp.check_same_model raises when they differ)."""
    same = ddp.check_same_model(run.model)
    items = run.items["test"]
    m = classification_metrics(items.labels, probs.argmax(1).tolist(), run.classes,
                               items.sources, probs.tolist())
    m["timings_s"] = {**run.timings, "total": time.time() - run.started}
    m["timings_s"].pop("elapsed", None)
    if ddp.world() > 1:
        m["ranks"] = {"n": ddp.world(), "same_model": same}
    return m


def write_outputs(run, m, probs):
    """The test split's metrics, predictions, the run's report.md and MODEL_CARD.md (rank 0);
    last.pt goes (only --resume reads it, and the run is over; --keep-last keeps it); then the
    run folder is whole, and its lock goes (runlock)."""
    with open(os.path.join(run.dir, "test_metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    write_predictions(os.path.join(run.dir, "test_predictions.csv"), run.items["test"],
                      run.items["test"].labels, probs.tolist(), run.classes)
    write_report(run.dir)
    write_model_card(run.dir)
    if not run.cfg.keep_last:
        drop_last(run.dir)
    runlock.release(run.dir)
