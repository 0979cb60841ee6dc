"""evaluate.py: metrics and files from a checkpoint, class mapping, and bad checkpoints."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import evaluate
import phantom
from model import build_model, load_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    path = tmp_path / "run" / "model.pt"
    os.makedirs(path.parent)
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES,
                "config": {"arch": "resnet18"}, "size": 32}, path)
    return path


def test_evaluate_writes_metrics_tables_and_plots(checkpoint, tmp_path):
    out = tmp_path / "eval"
    m = evaluate.main([str(checkpoint.parent), "--data", "phantom", "--phantoms", "40",
                       "--cache-dir", "", "--tta", "1", "--out", str(out), "--batch-size", "16"])
    assert m["n"] == 40 and m["size"] == 32 and m["tta"] == 1
    assert set(os.listdir(out)) == {"metrics.json", "metrics.md", "predictions.csv",
                                    "confusion_matrix.png", "roc.png"}
    saved = json.load(open(out / "metrics.json"))
    assert saved["accuracy"] == m["accuracy"] and "per_source" in saved
    for c in phantom.CLASSES:
        r = saved["per_class"][c]
        assert {"sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"} <= set(r)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 40
    assert all(abs(sum(float(r[f"p_{c}"]) for c in phantom.CLASSES) - 1) < 1e-4 for r in rows)
    for png, size in [("confusion_matrix.png", (620, 600)), ("roc.png", (800, 500))]:
        img = Image.open(out / png)
        assert img.size == size  # the matrix: 110 px per class and margins for the labels
        assert len(np.unique(np.asarray(img.convert("L")))) > 10
    assert "balanced accuracy" in open(out / "metrics.md").read()


def test_class_mapping():
    model = ["COVID-19", "bacterial", "normal", "viral"]
    assert evaluate.map_classes(["normal", "covid-19"], model) == {0: 2, 1: 0}
    assert evaluate.map_classes(["bacteria", "viral"], model, "bacteria=bacterial") == \
        {0: 1, 1: 3}
    with pytest.raises(SystemExit, match=r"\['pneumonia'\].*--class-map"):
        evaluate.map_classes(["normal", "pneumonia"], model)


def test_bad_checkpoints_are_named(tmp_path, checkpoint):
    with pytest.raises(SystemExit, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        load_checkpoint(str(cut))
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(SystemExit, match="not a COVID-ResNet checkpoint"):
        load_checkpoint(str(other))
    model, ck = load_checkpoint(str(checkpoint.parent))  # a run folder means its model.pt
    assert ck["classes"] == phantom.CLASSES and model.head[-1].out_features == 4
