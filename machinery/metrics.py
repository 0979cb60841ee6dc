"""Classification metrics with 95% confidence intervals, from predictions or a confusion matrix.

    m = classification_metrics(y_true, y_pred, classes)    # dict, JSON-ready
    print(format_metrics(m))

Test sets in this field are small (COVIDx v1 has 10 COVID-19 test films), so every proportion
comes with a Wilson score interval: unlike the normal approximation it stays inside [0, 1] and
is honest at 10/10 (Brown, Cai & DasGupta, Statistical Science 2001).
"""
import math
from itertools import groupby
from operator import itemgetter

Z95 = 1.959963984540054


def wilson(successes, n, z=Z95):
    """Wilson score interval (lo, hi) for a proportion successes/n; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion_matrix(y_true, y_pred, n_classes):
    """cm[t][p] = number of images of true class t predicted as p."""
    cm = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(y_true, y_pred):
        cm[int(t)][int(p)] += 1
    return cm


def _rate(k, n):
    """{value, ci95} for k/n; value None where n == 0 (undefined, not zero)."""
    return {"value": k / n if n else None, "ci95": list(wilson(k, n)), "k": k, "n": n}


def roc_auc(scores, positive):
    """Area under the ROC curve: P(score of a random positive > one of a random negative),
    ties counting half (the Mann-Whitney U statistic). None without both kinds of image."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum, below = 0.0, 0  # the positives' ranks from 1, tied scores sharing their mean
    for _, tied in groupby(sorted(zip(scores, positive)), key=itemgetter(0)):
        tied = [p for _, p in tied]
        rank_sum += sum(tied) * (below + (len(tied) + 1) / 2)
        below += len(tied)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_curve(scores, positive):
    """(false positive rates, true positive rates), threshold sweeping from high to low."""
    n_pos, n_neg = sum(positive), len(positive) - sum(positive)
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for _, tied in groupby(sorted(zip(scores, positive), reverse=True), key=itemgetter(0)):
        tied = [p for _, p in tied]
        tp, fp = tp + sum(tied), fp + len(tied) - sum(tied)
        fpr.append(fp / max(n_neg, 1))  # one point per distinct threshold
        tpr.append(tp / max(n_pos, 1))
    return fpr, tpr


def classification_metrics(y_true, y_pred, classes, sources=None, probs=None):
    """Accuracy, balanced accuracy, macro-F1, confusion matrix, and per class sensitivity,
    specificity, PPV, NPV and F1 with 95% Wilson intervals; ROC-AUC one-vs-rest with `probs`.

    F1 = TP / (TP + (FP + FN) / 2) is treated as a proportion of TP + (FP + FN) / 2 trials
    for its interval: an approximation, but one that shrinks with the evidence as it should.
    With `sources` (one per image), the same metrics per source too: a model that scores very
    differently on two hospitals' films may have learnt the hospital, not the disease.
    A rate with nothing to divide by (a class never predicted has no PPV) is None, not 0.
    """
    C = len(classes)
    y_true, y_pred = [int(t) for t in y_true], [int(p) for p in y_pred]
    cm = confusion_matrix(y_true, y_pred, C)
    n = len(y_true)
    per_class = {}
    for i, c in enumerate(classes):
        tp = cm[i][i]
        fn = sum(cm[i]) - tp
        fp = sum(cm[r][i] for r in range(C)) - tp
        tn = n - tp - fn - fp
        f1_n = tp + (fp + fn) / 2
        per_class[c] = {"support": tp + fn, "sensitivity": _rate(tp, tp + fn),
                        "specificity": _rate(tn, tn + fp), "ppv": _rate(tp, tp + fp),
                        "npv": _rate(tn, tn + fn),
                        "f1": {"value": tp / f1_n if f1_n else None,
                               "ci95": list(wilson(tp, f1_n))}}
        if probs is not None:
            per_class[c]["roc_auc"] = roc_auc([float(p[i]) for p in probs],
                                              [t == i for t in y_true])
    f1s = [m["f1"]["value"] or 0.0 for m in per_class.values()]
    sens = [m["sensitivity"]["value"] for m in per_class.values()
            if m["sensitivity"]["value"] is not None]
    out = {"n": n, "accuracy": _rate(sum(cm[i][i] for i in range(C)), n),
           "balanced_accuracy": sum(sens) / len(sens) if sens else None,
           "macro_f1": sum(f1s) / C, "per_class": per_class, "confusion_matrix": cm,
           "classes": list(classes)}
    if sources and any(sources):
        out["per_source"] = {}
        for s in sorted(set(sources)):
            idx = [k for k, src in enumerate(sources) if src == s]
            out["per_source"][s] = classification_metrics(
                [y_true[k] for k in idx], [y_pred[k] for k in idx], classes,
                probs=None if probs is None else [probs[k] for k in idx])
    return out


def _pct(r):
    if r["value"] is None:
        return "n/a"
    return f"{100 * r['value']:5.1f} [{100 * r['ci95'][0]:4.1f}, {100 * r['ci95'][1]:5.1f}]"


def format_metrics(m):
    """The metrics as a plain-text table, for the terminal and the logs."""
    acc, bal = m["accuracy"], m["balanced_accuracy"]
    lines = [f"accuracy {_pct(acc)} % ({acc['k']}/{acc['n']}), balanced accuracy "
             f"{'n/a' if bal is None else f'{100 * bal:.1f} %'}, macro-F1 {m['macro_f1']:.3f}",
             "95% Wilson intervals in brackets", "",
             f"{'class':>12} {'n':>5}  {'sensitivity %':>20}  {'PPV %':>20}  {'F1 %':>20}"]
    for c, r in m["per_class"].items():
        lines.append(f"{c:>12} {r['support']:>5}  {_pct(r['sensitivity']):>20}  "
                     f"{_pct(r['ppv']):>20}  {_pct(r['f1']):>20}")
    if "roc_auc" in next(iter(m["per_class"].values())):
        lines += ["", f"{'class':>12} {'specificity %':>20}  {'NPV %':>20}  {'ROC-AUC':>8}"]
        for c, r in m["per_class"].items():
            auc = "n/a" if r["roc_auc"] is None else f"{r['roc_auc']:.3f}"
            lines.append(f"{c:>12} {_pct(r['specificity']):>20}  {_pct(r['npv']):>20}  "
                         f"{auc:>8}")
    w = max(8, *(len(c) for c in m["classes"]))
    heads = " ".join(f"{c[:w]:>{w}}" for c in m["classes"])  # a column per class
    lines += ["", "confusion matrix (rows: true, columns: predicted)", " " * (w + 1) + heads]
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        lines.append(f"{c[:w]:>{w}} " + " ".join(f"{v:>{w}}" for v in row))
    if "per_source" in m:
        lines += ["", "per source: accuracy, and sensitivity % per class (a large gap between "
                  "sources can mean a shortcut)",
                  f"{'source':>12} {'n':>5}  {'accuracy %':>20}  " + heads]
        for s, r in m["per_source"].items():
            sens = [r["per_class"][c]["sensitivity"]["value"] for c in m["classes"]]
            lines.append(f"{s:>12} {r['n']:>5}  {_pct(r['accuracy']):>20}  " + " ".join(
                f"{'n/a' if v is None else f'{100 * v:.1f}':>{w}}" for v in sens))
    return "\n".join(lines)
