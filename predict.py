"""Predict radiographs with a trained model; optionally show where it looked (Grad-CAM).

    python predict.py runs/NAME image.png folder/          # -> runs/NAME/predictions.csv
    python predict.py runs/NAME/model.pt folder/ --out p.csv --cam cams/

Writes one CSV row per image (class probabilities and the top class), by default into the run
folder (beside a checkpoint file). Files that are not images, or cannot be read, are listed as
skipped; the rest are predicted. With --cam, each image gets a Grad-CAM heat map (Selvaraju et
al., ICCV 2017) from the last convolutional block, blended over the original radiograph at its
original size (with --resize crop the model sees, and the heat map covers, the film's centre
square, as fastai v1 validates). A heat map shows what drove the score, not where the disease
is: a bright patch on a text marker or the edge of the film is a reason to distrust the model.

From Python, the same in a few lines (the API; evaluate.py loads its model with it too):

    from predict import Classifier
    clf = Classifier.load("runs/NAME")              # a run folder or a .pt checkpoint
    clf.predict("film.png")                         # {'COVID-19': 0.03, 'bacterial': ...}
    clf.predict([pil_image, uint16_array, tensor])  # any size and bit depth: a dict each
    heat, label = clf.gradcam("film.png")           # (h, w) in [0, 1], for the top class
    Classifier.load("runs/NAME", hide="lungs")      # films without their lungs: a shortcut test

Films are resized and normalised as in training. A film that cannot be read raises a
FilmError, a bad checkpoint a CheckpointError, each naming the input; the command line turns
them into a message and exit status 1.
"""
import argparse
import csv
import os
import warnings
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data import eval_batches, normalize, view
from machinery import devices
from machinery.checkpoint import CheckpointError, load_checkpoint, run_dir_of
from machinery.flags import Help
from machinery.datasets import DataError, run_cli
from machinery.films import CROP_MARGIN, decode, squares, stored_size, stretch, upright_gray
from machinery.plots import jet
from machinery.shortcuts import HIDE, WHOLE, Hidden
from model import class_logits, gradcam

__all__ = ["Classifier", "FilmError", "CheckpointError"]  # the API (CheckpointError: a bad file)


class FilmError(DataError):
    """An input that is not a readable film; the message names it and why, `why` says why."""

    def __init__(self, message, why=""):
        super().__init__(message)
        self.why = why or message


LUMA = (0.299, 0.587, 0.114)  # Pillow's convert("L") of RGB


def as_image(film):
    """A PIL image, or a numpy array or torch tensor of one film: (H, W), (H, W, 3|4) or
    (1|3|4, H, W) -> a PIL image that squares() makes one 8-bit channel: uint8 as it is, floats
    as intensities in [0, 1] (to_tensor's), other integers by their used range (films.to_gray);
    colour of any kind to gray by the same luma."""
    if isinstance(film, Image.Image):
        return film
    if isinstance(film, torch.Tensor):
        film = film.detach().cpu().numpy()
    a = np.asarray(film)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 1 or a.ndim == 3 and a.shape[2] not in (3, 4):
        raise ValueError(f"an array of shape {a.shape} is not a film (give (H, W), (H, W, 3) "
                         "or (C, H, W))")
    if a.dtype == np.uint8:
        return Image.fromarray(a)
    integers = a.dtype.kind in "iu"
    if a.ndim == 3:  # colour: Pillow's luma, as uint8 colour becomes gray (ITU-R 601-2)
        a = a[..., :3].astype(np.float32) @ np.array(LUMA, np.float32)
    return Image.fromarray(stretch(a) if integers else a.astype(np.float32))


class Classifier:
    """A trained model ready to classify films: what predict.py and evaluate.py use.

    classes: the model's class names; size: its input size; crop: --resize crop (the centre
    square, as fastai v1 validates) or squish; amp and channels_last: the device's settings;
    hidden: what of every film is blacked out (--hide: a shortcut test's shortcuts.Hidden)."""

    def __init__(self, model, classes, size, crop, device, amp=None, channels_last=False,
                 hidden=WHOLE, config=None, weights=""):
        fmt = torch.channels_last if channels_last else torch.preserve_format
        self.model = model.to(device, memory_format=fmt).eval()
        self.classes, self.size, self.crop, self.hidden = list(classes), size, crop, hidden
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.config = config or {}  # how it was trained
        self.weights = weights  # what the weights are, when not a run's model.pt (which_weights)
        # every film stored at the crop margin: its result never depends on the others'
        self.store = stored_size(size, "crop" if crop else "squish", CROP_MARGIN)

    @classmethod
    def load(cls, path, device="auto", precision="auto", channels_last="auto", size=0,
             hide="", hide_box=0.0, allow_unfinished=False):
        """A run folder or checkpoint -> Classifier (CheckpointError if it is not one, or if
        it is an unfinished run's last.pt, unless allow_unfinished).

        hide: none | lungs | outside, and hide_box, as train.py's --hide (default: as the
        model was trained: a shortcut test's films hidden as it hid them). `hide="lungs"` on
        a model trained on whole films tells what it makes of films without their lungs."""
        model, ck = load_checkpoint(path, allow_unfinished)
        trained = ck.get("config", {})  # how it was trained (evaluate.py's augmentation)
        crop = trained.get("resize", "squish") == "crop"
        hidden = Hidden.of(trained)  # a ValueError for a hide or box it does not know:
        hidden = replace(hidden, what=hide or hidden.what, box=hide_box or hidden.box)
        if hide_box and not hidden:
            raise ValueError(f"hide_box {hide_box}: a box of what? Give hide='lungs' or "
                             "'outside' with it")
        dev = devices.pick_device(device)
        return cls(model, ck["classes"], size or ck.get("size") or 224, crop, dev,
                   devices.precision(dev, precision), devices.channels_last(dev, channels_last),
                   hidden, config=trained, weights=ck["weights"])

    def prepare(self, film):
        """One film (a path, PIL image, array or tensor) -> (uint8 (T, T) film, its height /
        width), or a FilmError naming it."""
        if isinstance(film, (str, os.PathLike)):
            name, r = str(film), decode(film, [self.store], self.hidden)
        else:
            name = f"a {type(film).__name__}"
            try:
                r = squares(as_image(film), [self.store], self.hidden)
            except Exception as e:  # not an image's shape or type
                r = f"{type(e).__name__}: {e}"
        if isinstance(r, str):
            raise FilmError(f"{name}: not a readable film ({r})", why=f"({r})")
        (w, h), (pixels,) = r
        if pixels.min() == pixels.max():  # answered all the same, as for any other input
            warnings.warn(f"{name}: no contrast at all (every pixel {pixels.flat[0]}): not a "
                          "film? Its probabilities say nothing about one")
        return pixels, h / w

    def probabilities_of(self, pixels, hw, batch_size=64):
        """Prepared films (sequences from prepare) -> class probabilities (N, C) on the CPU."""
        images = torch.from_numpy(np.stack(pixels))[:, None].to(self.device)  # (N, 1, T, T)
        hw = torch.tensor(hw, device=self.device) if self.crop else None
        batches = eval_batches(images, self.size, hw, batch_size, channels_last=self.channels_last)
        return class_logits(self.model, self.model, batches, self.amp).softmax(1).cpu()

    def probabilities(self, films, batch_size=64):
        """Films (paths, PIL images, arrays, tensors) -> class probabilities (N, C)."""
        if not len(films):
            raise FilmError("no films given: pass one film, or a list of them")
        pixels, hw = zip(*[self.prepare(f) for f in films])
        return self.probabilities_of(pixels, hw, batch_size)

    def predict(self, films, batch_size=64):
        """{class name: probability} for one film, or a list of them for a list of films."""
        one = not isinstance(films, (list, tuple))
        probs = self.probabilities([films] if one else films, batch_size).tolist()
        out = [dict(zip(self.classes, p)) for p in probs]
        return out[0] if one else out

    def input_of(self, pixels, hw):
        """A prepared film -> the body's input (1, 3, size, size), as evaluation sees it."""
        x = torch.from_numpy(np.array(pixels))[None, None].to(self.device).float() / 255
        h = torch.tensor([hw], device=self.device) if self.crop else None
        return normalize(view(x, self.size, h), self.channels_last)

    def gradcam(self, film, target=None):
        """(heat map (h, w) in [0, 1] over what the model saw, the class it explains): the
        top class, or `target` (a class name)."""
        pixels, hw = self.prepare(film)
        x = self.input_of(pixels, hw)
        if target is None:  # the class predict() gives it, under the same precision
            target = self.classes[int(self.probabilities_of([pixels], [hw])[0].argmax())]
        if target not in self.classes:
            raise ValueError(f"{target!r} is not one of the model's classes {self.classes}")
        return gradcam(self.model, x, self.classes.index(target)).cpu(), target


def find_files(args):
    """Every file named, or found under a named folder, in a stable order."""
    files = []
    for a in args:
        if os.path.isdir(a):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(a) for f in fs)
        else:
            files.append(a)
    return files


def save_cam(path, image_path, cam, crop, caption="", alpha=0.45, hidden=WHOLE):
    """Blend the heat map over the original radiograph, at the radiograph's own size: over
    the whole film, or with crop over the centre square that the model saw; hidden: --hide's
    box blacked out, as the model saw it. Below it, a strip with the caption (the class
    explained, its probability) and the colour bar."""
    with Image.open(image_path) as img:
        gray = Image.fromarray(upright_gray(img, hidden))
    W, H = gray.size
    h, w = (min(W, H),) * 2 if crop else (H, W)
    top, left = (H - h) // 2, (W - w) // 2
    heat = F.interpolate(cam[None, None].float(), size=(h, w), mode="bilinear",
                         align_corners=False)[0, 0].clamp(0, 1).numpy()
    out = np.asarray(gray.convert("RGB"), dtype=np.float32)  # a copy: float, not uint8
    win = out[top:top + h, left:left + w]
    win[:] = (1 - alpha) * win + alpha * jet(heat).astype(np.float32)
    text = max(10, W // 40)  # the caption's size follows the film's
    sheet = Image.new("RGB", (W, H + 3 * text), "white")
    sheet.paste(Image.fromarray(out.round().astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=text)
    draw.text((4, H + text // 4), caption, fill="black", font=font)
    bar = jet(np.tile(np.linspace(0, 1, max(1, W // 3)), (text, 1)))  # low ... high
    x0 = W - bar.shape[1] - 4
    sheet.paste(Image.fromarray(bar), (x0, H + text // 4))
    draw.text((x0, H + text * 5 // 4), "low", fill="black", font=font)
    draw.text((W - 4, H + text * 5 // 4), "high", fill="black", font=font, anchor="ra")
    sheet.save(path)


def cam_names(files, folder):
    """A heat map's path for each file: its path below the files' common folder, so that
    a/x.png and b/x.png do not overwrite each other (a/x_cam.png, b/x_cam.png)."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return [os.path.join(folder, os.path.splitext(os.path.relpath(os.path.abspath(f), root))[0]
                         + "_cam.png") for f in files]


def add_model_flags(p):
    """The model's flags of predict.py and evaluate.py, in their own group of p's help."""
    g = p.add_argument_group("the model")
    g.add_argument("checkpoint", help="a run folder (its model.pt) or a .pt checkpoint")
    g.add_argument("--size", type=int, default=0, metavar="N",
                   help="image size (default: the model's)")
    g.add_argument("--hide", default="", choices=["", *HIDE], metavar="{" + ",".join(HIDE) + "}",
                   help="a shortcut test: lungs (each film's central box blacked out) | outside "
                   "(all but it) | none (default: as the model was trained; --hide lungs on a "
                   "model of whole films: what it makes of films without their lungs)")
    g.add_argument("--hide-box", type=float, default=0.0, metavar="X",
                   help="--hide's box: its share of each side of the square the model sees "
                   f"(default: the model's, else {WHOLE.box})")
    g.add_argument("--allow-unfinished", action="store_true",
                   help="take the weights of an unfinished run (its last.pt) all the same")


def add_device_flags(p, logits="logits"):
    """--device, --precision and --channels-last of predict.py and evaluate.py: their group."""
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", metavar="DEV", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", default="auto", choices=devices.PRECISIONS,
                   help=f"auto: bf16 autocast on CUDA, fp32 on the CPU; {logits} are fp32 "
                   "either way")
    g.add_argument("--channels-last", default="auto", choices=devices.SWITCHES,
                   help="NHWC memory layout: auto (on CUDA only) | on | off")
    return g


def load_for(p, a):
    """The Classifier of a script's flags (checkpoint, device, precision, ..., --hide)."""
    try:
        return Classifier.load(a.checkpoint, a.device, a.precision, a.channels_last, a.size,
                               a.hide, a.hide_box, a.allow_unfinished)
    except DataError:  # a bad checkpoint: said by run_cli
        raise
    except ValueError as e:  # --hide and --hide-box that do not go together
        p.error(f"--hide {a.hide or 'as trained'} --hide-box {a.hide_box or 'as trained'}: {e}")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s CHECKPOINT IMAGE [IMAGE ...] [flags below]")
    add_model_flags(p)
    g = p.add_argument_group("films and output")
    g.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    g.add_argument("--out", default="", metavar="CSV",
                   help="the CSV to write (default: predictions.csv in the run folder, or beside "
                   "a checkpoint file)")
    g.add_argument("--cam", default="", metavar="DIR",
                   help="folder for Grad-CAM overlays (default: none)")
    g.add_argument("--cam-class", default="", metavar="CLASS",
                   help="the class the heat maps explain (default: each film's top class)")
    g.add_argument("--batch-size", type=int, default=64, metavar="N", help="films per batch")
    add_device_flags(p, "logits and Grad-CAM")
    return p


def main(argv=None):
    p = make_parser()
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.size < 0:
        p.error(f"--batch-size {a.batch_size} --size {a.size}: give a batch of 1 or more and "
                "a size of 0 (the model's) or more")
    clf = load_for(p, a)
    a.out = a.out or os.path.join(run_dir_of(a.checkpoint) or ".", "predictions.csv")
    if a.cam_class and a.cam_class not in clf.classes:
        p.error(f"--cam-class {a.cam_class}: not one of the model's classes {clf.classes}")
    files, prepared, skipped = [], [], []
    for f in find_files(a.images):
        try:
            prepared.append(clf.prepare(f))
            files.append(f)
        except FilmError as e:  # not an image, or unreadable: listed, the rest go on
            skipped.append((f, e.why))
            print(f"skipped {f}: {e.why}")
    if not files:
        raise FilmError("no readable images among " + ", ".join(a.images))
    pixels, hw = zip(*prepared)
    probs = clf.probabilities_of(pixels, hw, a.batch_size)
    classes, top = clf.classes, probs.argmax(1).tolist()

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted"] + [f"p_{c}" for c in classes])
        for path, t, pr in zip(files, top, probs.tolist()):
            w.writerow([path, classes[t]] + [f"{v:.6f}" for v in pr])
    if a.cam:
        for k, (path, dst) in enumerate(zip(files, cam_names(files, a.cam))):
            c = classes.index(a.cam_class) if a.cam_class else top[k]
            cam = gradcam(clf.model, clf.input_of(pixels[k], hw[k]), c).cpu()
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            save_cam(dst, path, cam, clf.crop,
                     f"Grad-CAM of {classes[c]}: p = {100 * float(probs[k, c]):.1f}%",
                     hidden=clf.hidden)
    for path, t, pr in zip(files[:5], top, probs.tolist()):  # a first look; the CSV
        print(f"  {classes[t]:>12} {100 * pr[t]:5.1f}%  {path}")
    print(f"{len(files)} images predicted, {len(skipped)} skipped; wrote "
          f"{os.path.abspath(a.out)}" + (f" and heat maps in {a.cam}" if a.cam else ""))
    return files, probs, skipped


if __name__ == "__main__":
    run_cli(main)
