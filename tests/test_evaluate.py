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
from data import Augment
from machinery import datasets, phantom
from machinery.checkpoint import CheckpointError, load_checkpoint
from machinery.datasets import DataError
from model import build_model
from test_datasets import make_covidx


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
    assert m["n"] == 40 and m["size"] == 32 and m["tta"] == "1"
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
    with pytest.raises(DataError, match=r"\['pneumonia'\].*--class-map"):
        evaluate.map_classes(["normal", "pneumonia"], model)


def test_bad_checkpoints_are_named(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(cut))
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(CheckpointError, match="not a COVID-ResNet checkpoint"):
        load_checkpoint(str(other))
    model, ck = load_checkpoint(str(checkpoint.parent))  # a run folder means its model.pt
    assert ck["classes"] == phantom.CLASSES and model.head[-1].out_features == 4


class Recorder(torch.nn.Module):
    """A stand-in model: logits from a fixed table, one row per call; records its inputs."""

    def __init__(self, probs):
        super().__init__()
        self.probs, self.inputs = probs, []
        self.head = torch.nn.Sequential(torch.nn.Linear(1, probs.shape[1]))

    def forward(self, x):
        self.inputs.append(x[:, 0].clone())
        return self.probs[len(self.inputs) - 1].log().expand(len(x), -1)


def test_tta_v1_is_fastai_v1s_weights_and_views():
    torch.manual_seed(0)
    probs = torch.rand(9, 3).softmax(1)  # call 0: the plain pass; 1..8: the eight views
    model = Recorder(probs)
    film = torch.zeros(2, 1, 48, 48, dtype=torch.uint8)
    film[:, :, :24, :24] = 255  # the top-left quarter bright
    no_random = Augment(warp=0, rotate=0, lighting=0)  # only the views' own geometry left
    out = evaluate.tta_probs(model, film, 32, None, no_random, "v1", batch_size=2)
    assert torch.allclose(out, (0.4 * probs[0] + 0.6 * probs[1:].mean(0)).expand(2, -1))
    assert len(model.inputs) == 9
    bright = [x.mean().item() for x in model.inputs[1:]]
    # view i: zoom 1.35 and crop towards row i&1, column i&2, flipped when i&4
    assert bright[0] == pytest.approx(max(bright)) and bright[3] == pytest.approx(min(bright))
    assert bright[0] > bright[1] + 0.5 and bright[0] > bright[2] + 0.5  # top-left is brightest
    for i in range(4):
        assert torch.allclose(model.inputs[1 + i], model.inputs[5 + i].flip(-1), atol=1e-5)
    plain = model.inputs[0]
    assert bright[0] > plain.mean().item()  # zoomed into the bright corner


def test_tta_k_passes_average_equally():
    probs = torch.rand(4, 3).softmax(1)
    model = Recorder(probs)
    film = torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8)
    out = evaluate.tta_probs(model, film, 32, None, Augment(), "3", batch_size=2)
    assert torch.allclose(out, probs.mean(0).expand(2, -1)) and len(model.inputs) == 4


def test_a_demo_runs_phantoms_come_from_its_config_and_tta_has_its_own_folder(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "run" / "model.pt"
    os.makedirs(path.parent)
    torch.save({"model": build_model(4, "none", "resnet18").state_dict(),
                "classes": phantom.CLASSES, "size": 32,
                "config": {"arch": "resnet18", "phantoms": 300, "phantom_seed": 3}}, path)
    base = [str(path.parent), "--data", "phantom", "--cache-dir", "", "--batch-size", "32"]
    m = evaluate.main(base)
    assert m["n"] == 60  # the run's 300 phantoms: its test split of 300 // 5
    _, splits = datasets.phantom_dataset(300, 3)
    rows = list(csv.DictReader(open(path.parent / "eval_phantom_test" / "predictions.csv")))
    assert [r["patient"] for r in rows] == splits["test"].patients  # the run's own films
    assert evaluate.main(base + ["--phantoms", "200", "--phantom-seed", "1"])["n"] == 40
    evaluate.main(base + ["--tta", "1"])
    assert sorted(os.listdir(path.parent)) == ["eval_phantom_test", "eval_phantom_test_tta-1",
                                               "model.pt"]


def test_evaluation_batches_are_the_runs_own_last_one_padded(checkpoint, monkeypatch):
    """By default evaluate.py takes the batch size train.py evaluated at (the run's last
    stage's), its last batch padded: one shape, so the same cuDNN algorithms and the same
    bf16 roundings as the run's own test, film for film."""
    ck = torch.load(checkpoint, weights_only=True)
    torch.save({**ck, "config": {**ck["config"], "batch_size": "16,12"}}, checkpoint)
    shapes = []
    real = evaluate.eval_batches

    def seen(*args, **kwargs):
        for x, n in real(*args, **kwargs):
            shapes.append((tuple(x.shape), n))
            yield x, n
    monkeypatch.setattr(evaluate, "eval_batches", seen)
    base = [str(checkpoint.parent), "--data", "phantom", "--phantoms", "40", "--cache-dir", ""]
    evaluate.main(base)  # 40 test films in batches of 12: 12, 12, 12, 4 padded to 12
    assert shapes == [((12, 3, 32, 32), 12)] * 3 + [((12, 3, 32, 32), 4)]
    shapes.clear()
    evaluate.main(base + ["--batch-size", "32"])  # a batch size given still wins
    assert shapes == [((32, 3, 32, 32), 32), ((32, 3, 32, 32), 8)]


def test_films_that_cannot_be_read_are_named_and_left_out(checkpoint, tmp_path, capsys):
    """A float film with NaN pixels and a file that is no image: evaluate.py names both, leaves
    them out of every metric, and caches nothing (they are found again next time)."""
    make_covidx(tmp_path / "d")  # 6 test films, normal and COVID-19: classes of the model
    nan = np.random.default_rng(0).random((30, 40)).astype(np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(tmp_path / "d" / "test" / "test2.tif")
    (tmp_path / "d" / "test" / "test3.png").write_bytes(b"not a png")
    split = (tmp_path / "d" / "test.txt").read_text().replace("test2.png", "test2.tif")
    (tmp_path / "d" / "test.txt").write_text(split)
    argv = [str(checkpoint.parent), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "e"),
            "--cache-dir", str(tmp_path / "cache")]
    m = evaluate.main(argv)
    out = capsys.readouterr().out
    assert m["n"] == 4 and [s["path"].rsplit(os.sep, 1)[1] for s in m["skipped"]] == [
        "test2.tif", "test3.png"]
    assert "NaN or infinite" in m["skipped"][0]["why"]
    assert "skipped 2 film(s) that could not be read, left out of every metric" in out
    assert "2 film(s) could not be read and are left out: " in (tmp_path / "e" /
                                                                 "metrics.md").read_text()
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    assert [r["path"].rsplit(os.sep, 1)[1] for r in rows] == [
        "test0.png", "test1.png", "test4.png", "test5.png"]
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")
    assert evaluate.main(argv)["n"] == 4  # found again, not read from a cache
    for f in os.listdir(tmp_path / "d" / "test"):  # none readable: the data's error, said
        (tmp_path / "d" / "test" / f).write_bytes(b"not a film")
    with pytest.raises(DataError, match="6 images could not be read"):
        evaluate.main(argv)
