"""Evaluate a trained model on a data set's split: every screening metric, tables and plots.

    python evaluate.py runs/NAME --data PATH                  # its test split
    python evaluate.py runs/NAME/model.pt --data OTHER --split train --tta 4
    python evaluate.py runs/NAME --data OTHER --class-map bacteria=bacterial,viral=viral

Accuracy, balanced accuracy, macro-F1; per class sensitivity, specificity, PPV, NPV and F1
with 95% Wilson intervals, one-vs-rest ROC-AUC; the confusion matrix; and all of it per data
source where the split file names one. Written to --out (default RUN/eval_<data>_<split>/) as
metrics.json, metrics.md, predictions.csv, confusion_matrix.png and roc.png.
"""
import argparse
import json
import os

import torch

import data
from batches import Augment
from metrics import classification_metrics, format_metrics
from model import load_checkpoint
from plots import confusion_plot
from report import roc_plot, write_predictions
from train import class_logits, pick_device


def map_classes(data_classes, model_classes, class_map=""):
    """{data class index: model class index}; names match exactly, then ignoring case, then
    through class_map ("theirs=ours,..."). A class that maps nowhere is an error."""
    extra = dict(kv.split("=", 1) for kv in class_map.split(",") if kv)
    lower = {c.lower(): i for i, c in enumerate(model_classes)}
    out, missing = {}, []
    for i, c in enumerate(data_classes):
        name = extra.get(c, c)
        j = model_classes.index(name) if name in model_classes else lower.get(name.lower())
        if j is None:
            missing.append(c)
        out[i] = j
    if missing:
        raise SystemExit(f"classes {missing} of the data are not among the model's "
                         f"{model_classes}; map them with --class-map {missing[0]}=NAME,...")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder or a .pt checkpoint")
    p.add_argument("--data", required=True, help="COVIDx or ImageFolder root, or 'phantom'")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--train-split", default="", help="train split file, if not found by name")
    p.add_argument("--test-split", default="", help="test split file, if not found by name")
    p.add_argument("--image-dir", default="", help="folder holding all images")
    p.add_argument("--subtypes", default="", help="subtype.csv for 4-class labels")
    p.add_argument("--class-map", default="", help="data=model class names, comma separated")
    p.add_argument("--size", type=int, default=0, help="image size (default: the model's)")
    p.add_argument("--tta", type=int, default=0, help="test-time augmented passes averaged "
                   "with the plain one (default: 0, none)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~/.cache"),
                                                       "covid-resnet"))
    p.add_argument("--phantoms", type=int, default=2000, help="with --data phantom")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder")
    a = p.parse_args(argv)

    model, ck = load_checkpoint(a.checkpoint)
    classes, size = ck["classes"], a.size or ck.get("size") or 224
    dev = pick_device(a.device)
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    problems = data.Problems()
    data_classes, splits = data.load_dataset(a.data, a.train_split, a.test_split, a.image_dir,
                                             a.subtypes, a.phantoms, a.seed, True, True, problems)
    to_model = map_classes(data_classes, classes, a.class_map)
    items = splits[a.split]
    labels = [to_model[y] for y in items.labels]
    images = data.load_pixels(items, [size], a.cache_dir or None, problems=problems)
    problems.check()
    images = images[size].to(dev)

    probs = class_logits(model, model, images, a.batch_size).softmax(1)
    for k in range(a.tta):  # fastai's TTA: the mean of the plain and augmented predictions
        probs += class_logits(model, model, images, a.batch_size, Augment(), a.seed + k) \
            .softmax(1)
    probs = (probs / (1 + a.tta)).cpu()
    preds = probs.argmax(1).tolist()
    m = classification_metrics(labels, preds, classes, items.sources, probs.tolist())
    m.update(checkpoint=a.checkpoint, data=a.data, split=a.split, size=size, tta=a.tta)

    run_dir = a.checkpoint if os.path.isdir(a.checkpoint) else os.path.dirname(a.checkpoint)
    name = os.path.basename(os.path.normpath(a.data))
    out = a.out or os.path.join(run_dir or ".", f"eval_{name}_{a.split}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    table = format_metrics(m)
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(f"# {a.checkpoint} on {a.data} ({a.split} split, {size} px"
                f"{f', TTA {a.tta}' if a.tta else ''})\n\n```\n{table}\n```\n\n"
                "![confusion matrix](confusion_matrix.png) ![ROC curves](roc.png)\n")
    write_predictions(os.path.join(out, "predictions.csv"), items, labels, probs.tolist(),
                      classes)
    confusion_plot(os.path.join(out, "confusion_matrix.png"), m["confusion_matrix"], classes,
                   f"{name}, {a.split} split, {m['n']} images")
    roc_plot(os.path.join(out, "roc.png"), probs.tolist(), labels, classes, m["per_class"])
    print(f"{a.checkpoint} on {a.data}, {a.split} split, {size} px\n{table}\nwritten to {out}")
    return m


if __name__ == "__main__":
    data.run_cli(main)
