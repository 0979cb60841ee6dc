"""Metrics against hand-computed values, Wilson intervals against published ones."""
import pytest

from machinery.metrics import classification_metrics, format_metrics, roc_auc, roc_curve, wilson


def test_wilson_matches_published_values():
    # Newcombe, Statistics in Medicine 1998, table I: 81/263 -> 0.2553..0.3662
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)  # no evidence: anything is possible


def test_per_class_metrics_by_hand():
    # a: 3 images, 2 found; b: 3 images, never predicted; c: no images, predicted once
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [0, 0, 2, 0, 0, 0]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 0, 1], [3, 0, 0], [0, 0, 0]]
    assert m["accuracy"]["value"] == pytest.approx(2 / 6)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert a["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert a["ppv"]["value"] == pytest.approx(2 / 5)
    assert a["f1"]["value"] == pytest.approx(0.5)  # 2 TP / (2 + (3 FP + 1 FN) / 2)
    assert b["sensitivity"]["value"] == 0.0 and b["ppv"]["value"] is None  # no predictions
    assert c["sensitivity"]["value"] is None and c["ppv"]["value"] == 0.0  # no images
    assert c["support"] == 0 and a["support"] == 3
    assert m["macro_f1"] == pytest.approx(0.5 / 3)
    assert a["sensitivity"]["ci95"] == pytest.approx(list(wilson(2, 3)))
    # specificity TN / (TN + FP) and NPV TN / (TN + FN); TN = 6 - TP - FN - FP
    assert a["specificity"]["value"] == 0.0 and a["npv"]["value"] == 0.0
    assert b["specificity"]["value"] == 1.0 and b["npv"]["value"] == 0.5
    assert c["specificity"]["value"] == pytest.approx(5 / 6) and c["npv"]["value"] == 1.0
    # balanced accuracy: mean sensitivity over the classes that have images
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    table = format_metrics(m)
    assert "n/a" in table and "33.3" in table


def test_roc_auc_and_curve():
    scores, positive = [0.9, 0.8, 0.7, 0.6], [True, False, True, False]
    assert roc_auc(scores, positive) == pytest.approx(0.75)  # 3 of 4 pairs ranked right
    assert roc_auc([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc([0.1, 0.2], [True, True]) is None  # no negatives: undefined
    fpr, tpr = roc_curve(scores, positive)
    assert fpr == [0, 0, 0.5, 0.5, 1] and tpr == [0, 0.5, 0.5, 1, 1]


def test_per_source_metrics_and_auc_per_class():
    probs = [[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]
    m = classification_metrics([0, 0, 1, 1], [0, 0, 0, 1], ["x", "y"],
                               sources=["h1", "h1", "h2", "h2"], probs=probs)
    assert m["per_source"]["h1"]["accuracy"]["value"] == 1.0
    assert m["per_source"]["h2"]["accuracy"]["value"] == 0.5
    assert m["per_source"]["h2"]["per_class"]["y"]["sensitivity"]["value"] == 0.5
    assert m["per_class"]["x"]["roc_auc"] == pytest.approx(0.75)
    assert m["per_source"]["h1"]["per_class"]["x"]["roc_auc"] is None  # h1 has only x
    table = format_metrics(m)
    assert "ROC-AUC" in table and "per source" in table and "NPV" in table
    assert "per_source" not in classification_metrics([0], [0], ["x"], sources=[""])
