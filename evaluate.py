"""Evaluate a trained model on a data set's split: every screening metric, tables and plots.

    python evaluate.py runs/NAME --data PATH                  # its test split
    python evaluate.py runs/NAME/model.pt --data OTHER --split train --tta v1
    python evaluate.py runs/NAME --data OTHER --class-map bacteria=bacterial,viral=viral
    python evaluate.py runs/NAME --data PATH --hide lungs      # the same films, lungs hidden

Accuracy, balanced accuracy, macro-F1; per class sensitivity, specificity, PPV, NPV and F1
with 95% Wilson intervals, one-vs-rest ROC-AUC; the confusion matrix; and all of it per data
source where the split file names one. Written to --out (default RUN/eval_<data>_<split>/) as
metrics.json, metrics.md, predictions.csv, confusion_matrix.png and roc.png. Films are
resized as the model was trained (--resize crop: the centre crop, as fastai v1 validates).
--hide lungs on a model trained on whole films tells how much of its score survives without
the lungs (a shortcut test, docs/data.md).
"""
import argparse
import dataclasses
import json
import os

import torch

from data import Augment, eval_batches
from machinery import datasets, films
from machinery.checkpoint import run_dir_of
from machinery.config import READING, Config
from machinery.flags import Help, add_flags
from machinery.hostmem import HostImages, on_host
from machinery.metrics import classification_metrics, format_metrics
from machinery.plots import confusion_plot
from machinery.report import roc_plot, write_predictions
from machinery.shortcuts import WHOLE
from model import class_logits
from predict import add_device_flags, add_model_flags, load_for


def map_classes(data_classes, model_classes, class_map=""):
    """{data class index: model class index}; names match exactly, then ignoring case, then
    through class_map ("theirs=ours,..."). A class that maps nowhere is an error."""
    extra = dict(kv.split("=", 1) for kv in class_map.split(",") if kv)
    lower = {c.lower(): i for i, c in enumerate(model_classes)}
    out = {}
    for i, c in enumerate(data_classes):
        name = extra.get(c, c)
        out[i] = model_classes.index(name) if name in model_classes else lower.get(name.lower())
    missing = [data_classes[i] for i, j in out.items() if j is None]
    if missing:
        raise datasets.DataError(f"classes {missing} of the data are not among the model's "
                         f"{model_classes}; map them with --class-map {missing[0]}=NAME,...")
    return out


def tta_probs(model, images, size, hw, aug, tta, batch_size=128, seed=0, amp=None,
              channels_last=False):
    """Class probabilities (N, C) with test-time augmentation `tta`:

    'v1': fastai v1's Learner.TTA (vision/tta.py: _TTA): 0.4 x the plain prediction + 0.6 x the
          mean over 8 views, each zoomed 1.35x towards one corner of the film and cropped at
          that corner, 4 of them flipped, and all given the training's warp, rotation and
          lighting at random (with their probabilities);
    'k':  the mean of the plain prediction and k passes of the training augmentation.
    aug: the model's training augmentation (data.Augment); hw: films' height / width
    with --resize crop, else None; amp: the body's autocast dtype or None (model.class_logits);
    channels_last: NHWC batches (data.eval_batches).
    """
    def probs(transform=None):
        batches = eval_batches(images, size, hw, batch_size, pad=True, transform=transform,
                               channels_last=channels_last)  # one shape, as train.py's
        return class_logits(model, model, batches, amp).softmax(1)
    plain = probs()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    if tta != "v1":
        passes = [probs(lambda x, h: aug(x, gen, size, h)) for _ in range(int(tta))]
        return torch.stack([plain, *passes]).mean(0)

    def corner_view(i):
        def transform(x, h):
            n = len(x)
            p = aug.draw(n, gen, x.device)  # warp, rotation, lighting: random, as trained
            at = torch.tensor([float(i & 2 > 0), float(i & 1)], device=x.device).expand(n, 2)
            p.update(zoom=torch.full((n,), 1.35, device=x.device), zoom_at=at, crop_at=at,
                     flip=torch.full((n,), bool(i & 4), device=x.device))
            return aug(x, gen, size, h, p)
        return transform
    views = [probs(corner_view(i)) for i in range(8)]
    return 0.4 * plain + 0.6 * torch.stack(views).mean(0)


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s CHECKPOINT --data PATH [flags below]")
    add_model_flags(p)
    g = p.add_argument_group("the data")
    g.add_argument("--data", required=True, metavar="PATH",
                   help="COVIDx or ImageFolder root, or 'phantom' (required)")
    g.add_argument("--split", default="test", choices=["test", "train"],
                   help="the split to evaluate")
    add_flags(g, Config, READING, grouped=False)  # train.py's, as it reads the data
    g.add_argument("--class-map", default="", metavar="THEIRS=OURS,..",
                   help="the data's class names that are not the model's, and the model's for "
                   "each (default: names matched as they are, then ignoring case)")
    g.add_argument("--test-sources", default=None, metavar="NAME,..",
                   help="the test split: these sources' films, of both split files, as train.py "
                   "--test-sources (default: the run's, with the run's --data; none otherwise)")
    g.add_argument("--phantoms", type=int, default=0, metavar="N",
                   help="with --data phantom: its number of training films (default: the run's "
                        "--phantoms, so that the test split is the one the run was tested on)")
    g.add_argument("--phantom-seed", type=int, default=None, metavar="N",
                   help="with --data phantom: the seed of its films (default: the run's)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--tta", default="0", metavar="v1|K",
                   help="test-time augmentation: v1 (fastai v1's TTA: 0.4 plain + 0.6 mean of "
                   "8 corner views), or K: the mean of the plain pass and K augmented ones "
                   "(default: 0, none)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of TTA's random draws")
    g.add_argument("--batch-size", type=int, default=0, metavar="N",
                   help="films per evaluation batch, the last one padded (default: 0, the run's "
                        "last stage's, as train.py evaluated: the same shapes, so the same cuDNN "
                        "algorithms and bf16 roundings; 128 for a checkpoint without a config)")
    g.add_argument("--out", default="", metavar="DIR",
                   help="output folder (default: RUN/eval_<data>_<split>/, with _hide-<HIDE>, "
                   "_sources-<NAMES> and _tta-<TTA> added where given)")
    g = add_device_flags(p)
    g.add_argument("--data-on", default="auto", choices=["auto", "gpu", "cpu"],
                   help="the films on the device, or in host memory with each batch copied "
                        "(auto: the device when they fit in half its free memory)")
    return p


def main(argv=None):
    p = make_parser()
    a = p.parse_args(argv)

    if a.tta != "v1" and not a.tta.isdigit():
        p.error(f"--tta {a.tta}: give v1 or a number of passes")
    if a.batch_size < 0 or a.size < 0 or 0 < a.phantoms < 8:
        p.error(f"--batch-size {a.batch_size} --size {a.size} --phantoms {a.phantoms}: give a "
                "batch of 0 (the run's) or more, a size of 0 (the model's) or more, 8 phantoms "
                "or more")
    clf = load_for(p, a)
    classes, size, dev = clf.classes, clf.size, clf.device
    # resized and augmented as the model was trained (older checkpoints: squished films)
    cfg = {**dataclasses.asdict(Config()), "resize": "squish", **clf.config}
    batch_size = a.batch_size or int(str(clf.config.get("batch_size", 128)).split(",")[-1])
    # a demo run's phantoms, as it drew them, unless told otherwise
    phantoms = a.phantoms or clf.config.get("phantoms", 2000)
    phantom_seed = clf.config.get("phantom_seed", 0) if a.phantom_seed is None else a.phantom_seed
    held_out = clf.config.get("test_sources", "")
    same_data = os.path.realpath(a.data) == os.path.realpath(clf.config.get("data", ""))
    test_sources = held_out if a.test_sources is None and same_data else a.test_sources or ""
    if held_out and not test_sources and a.split == "test":
        print(f"warning: the model was trained with --test-sources {held_out}: this test split "
              "holds films of the sources it trained on (--test-sources to hold them out)")
    problems = datasets.Problems()
    data_classes, splits = datasets.load_dataset(a.data, a.train_split, a.test_split, a.image_dir,
                                                 a.subtypes, phantoms, phantom_seed, True, True,
                                                 problems, test_sources)
    to_model = map_classes(data_classes, classes, a.class_map)
    problems.check()
    items, skipped = splits[a.split], []  # films that cannot be read: named and left out
    decoded = films.load_pixels(items, [size], a.cache_dir or None, cfg["resize"],
                                hidden=clf.hidden, skipped=skipped)
    if skipped:
        items = items.subset(sorted(set(range(len(items))) - {i for i, _, _ in skipped}))
        print(f"skipped {len(skipped)} film(s) that could not be read, left out of every "
              "metric (all in metrics.json):\n" + "".join(f"  {path} ({why})\n"
                                                         for _, path, why in skipped[:20]))
    labels = [to_model[y] for y in items.labels]
    images = HostImages(decoded, size, dev) if on_host(
        decoded.nbytes(size), dev, a.data_on, what=f"of the {a.split} split at {size} px") \
        else decoded.to(size, dev)
    hw = decoded.hw.to(dev) if clf.crop else None
    aug = Augment(*(cfg[f.name] for f in dataclasses.fields(Augment)))
    probs = tta_probs(clf.model, images, size, hw, aug, a.tta, batch_size, a.seed, clf.amp,
                      clf.channels_last).cpu()
    m = classification_metrics(labels, probs.argmax(1).tolist(), classes, items.sources,
                               probs.tolist())
    m.update(checkpoint=a.checkpoint, data=a.data, split=a.split, size=size, tta=a.tta,
             hide=clf.hidden.what, hide_box=clf.hidden.box, test_sources=test_sources,
             skipped=[{"path": path, "why": why} for _, path, why in skipped],
             weights=clf.weights)

    name = os.path.basename(os.path.normpath(a.data))
    # a TTA run, hidden films or held-out sources never overwrite the plain evaluation
    hidden = clf.hidden.what + ("" if clf.hidden.box == WHOLE.box else f"-{clf.hidden.box}")
    made_by = "".join(f"_{k}-{v}" for k, v in [("hide", hidden), ("sources", test_sources),
                                               ("tta", a.tta)] if v not in ("none", "", "0"))
    out = a.out or os.path.join(run_dir_of(a.checkpoint) or ".", f"eval_{name}_{a.split}{made_by}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1)
    table = format_metrics(m)
    said = "".join(f"{line}\n\n" for line in [
        f"**Evaluated on {clf.hidden.note()}: a shortcut test.**" if clf.hidden else "",
        f"**Not the finished model: {clf.weights}.**" if clf.weights else "",
        f"{len(skipped)} film(s) could not be read and are left out: " + ", ".join(
            f"{path} ({why})" for _, path, why in skipped[:10]) + "." if skipped else "",
        f"Test split: the films of the sources {test_sources} (--test-sources)."
        if test_sources and a.split == "test" else ""] if line)
    with open(os.path.join(out, "metrics.md"), "w") as f:
        f.write(f"# {a.checkpoint} on {a.data} ({a.split} split, {size} px"
                f"{f', TTA {a.tta}' if a.tta != '0' else ''})\n\n{said}```\n{table}\n```\n\n"
                "![confusion matrix](confusion_matrix.png) ![ROC curves](roc.png)\n")
    write_predictions(os.path.join(out, "predictions.csv"), items, labels, probs.tolist(), classes)
    confusion_plot(os.path.join(out, "confusion_matrix.png"), m["confusion_matrix"], classes,
                   f"{name}, {a.split} split, {m['n']} images")
    roc_plot(os.path.join(out, "roc.png"), probs.tolist(), labels, classes, m["per_class"])
    print(f"{a.checkpoint} on {a.data}, {a.split} split, {size} px\n{said}{table}\n"
          f"written to {out}")
    return m


if __name__ == "__main__":
    datasets.run_cli(main)
