"""Classification metrics with 95% confidence intervals, from predictions or a confusion matrix.

    m = classification_metrics(y_true, y_pred, classes)    # dict, JSON-ready
    print(format_metrics(m))

Test sets in this field are small (COVIDx v1 has 10 COVID-19 test films), so every proportion
comes with a Wilson score interval: unlike the normal approximation it stays inside [0, 1] and
is honest at 10/10 (Brown, Cai & DasGupta, Statistical Science 2001).
"""
import math

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


def classification_metrics(y_true, y_pred, classes, sources=None):
    """Accuracy, macro-F1, confusion matrix, and per class sensitivity, PPV and F1 with CIs.

    F1 = TP / (TP + (FP + FN) / 2) is treated as a proportion of TP + (FP + FN) / 2 trials
    for its interval: an approximation, but one that shrinks with the evidence as it should.
    With `sources` (one per image), the accuracy per source too: a model that scores very
    differently on two hospitals' films may have learnt the hospital, not the disease.
    """
    C = len(classes)
    cm = confusion_matrix(y_true, y_pred, C)
    n = sum(map(sum, cm))
    correct = sum(cm[i][i] for i in range(C))
    per_class = {}
    for i, c in enumerate(classes):
        tp = cm[i][i]
        fn = sum(cm[i]) - tp
        fp = sum(cm[r][i] for r in range(C)) - tp
        f1_n = tp + (fp + fn) / 2
        per_class[c] = {"support": tp + fn, "sensitivity": _rate(tp, tp + fn),
                        "ppv": _rate(tp, tp + fp),
                        "f1": {"value": tp / f1_n if f1_n else None,
                               "ci95": list(wilson(tp, f1_n))}}
    f1s = [m["f1"]["value"] or 0.0 for m in per_class.values()]
    out = {"n": n, "accuracy": _rate(correct, n), "macro_f1": sum(f1s) / C,
           "per_class": per_class, "confusion_matrix": cm, "classes": list(classes)}
    if sources and any(sources):
        out["per_source"] = {}
        for s in sorted(set(sources)):
            pairs = [(t, p) for t, p, src in zip(y_true, y_pred, sources) if src == s]
            out["per_source"][s] = _rate(sum(int(t) == int(p) for t, p in pairs), len(pairs))
    return out


def _pct(r):
    if r["value"] is None:
        return "n/a"
    return f"{100 * r['value']:5.1f} [{100 * r['ci95'][0]:4.1f}, {100 * r['ci95'][1]:5.1f}]"


def format_metrics(m):
    """The metrics as a plain-text table, for the terminal and the logs."""
    acc = m["accuracy"]
    lines = [f"accuracy {_pct(acc)} % ({acc['k']}/{acc['n']}), macro-F1 {m['macro_f1']:.3f}",
             "95% Wilson intervals in brackets", "",
             f"{'class':>12} {'n':>5}  {'sensitivity %':>20}  {'PPV %':>20}  {'F1 %':>20}"]
    for c, r in m["per_class"].items():
        lines.append(f"{c:>12} {r['support']:>5}  {_pct(r['sensitivity']):>20}  "
                     f"{_pct(r['ppv']):>20}  {_pct(r['f1']):>20}")
    w = max(8, *(len(c) for c in m["classes"]))
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * (w + 1) + " ".join(f"{c[:w]:>{w}}" for c in m["classes"])]
    for c, row in zip(m["classes"], m["confusion_matrix"]):
        lines.append(f"{c[:w]:>{w}} " + " ".join(f"{v:>{w}}" for v in row))
    if "per_source" in m:
        lines += ["", "accuracy per source (a large gap can mean a shortcut)"]
        for s, r in m["per_source"].items():
            lines.append(f"{s:>12} {r['n']:>5}  {_pct(r)}")
    return "\n".join(lines)
