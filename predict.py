"""Predict radiographs with a trained model; optionally show where it looked (Grad-CAM).

    python predict.py runs/NAME image.png folder/ --out predictions.csv
    python predict.py runs/NAME/model.pt folder/ --cam cams/

Writes one CSV row per image (class probabilities and the top class). Files that are not
images, or cannot be read, are listed as skipped; the rest are predicted. With --cam, each
image gets a Grad-CAM heat map (Selvaraju et al., ICCV 2017) from the last convolutional block,
blended over the original radiograph at its original size (with --resize crop the model sees,
and the heat map covers, the film's centre square, as fastai v1 validates). A heat map shows what
drove the score, not where the disease is: a bright patch on a text marker or the edge of the
film is a reason to distrust the model.
"""
import argparse
import csv
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from data import eval_batches, normalize, view
from machinery import devices
from machinery.checkpoint import load_checkpoint
from machinery.config import Help
from machinery.films import decode, film_aspect, stored_size, to_gray
from model import class_logits


def find_files(args):
    """Every file named, or found under a named folder, in a stable order."""
    files = []
    for a in args:
        if os.path.isdir(a):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(a) for f in fs)
        else:
            files.append(a)
    return files


def gradcam(model, x, target):
    """Grad-CAM of class `target` for one normalised image x (1, 3, H, W) -> (h, w) in [0, 1].

    The body's output (layer4) is weighted per channel by the mean gradient of the target
    logit, summed, and rectified: the regions whose features raise that class's score.
    """
    model.eval()
    with torch.enable_grad():
        feats = model.body(x).detach().requires_grad_(True)  # (1, C, h, w)
        # autograd.grad, not backward: no gradient is left on the model's weights
        grad, = torch.autograd.grad(model.head(feats)[0, target], feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1)
    cam = F.relu((weights * feats).sum(1))[0].detach()  # (h, w)
    return cam / cam.max() if cam.max() > 0 else cam


def jet(t):
    """Colour map for values in [0, 1]: blue, cyan, yellow, red. (H, W) -> (H, W, 3) uint8."""
    rgb = [np.clip(1.5 - np.abs(4 * t - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def save_cam(path, image_path, cam, crop, alpha=0.45):
    """Blend the heat map over the original radiograph, at the radiograph's own size: over
    the whole film, or with crop over the centre square that the model saw."""
    with Image.open(image_path) as img:
        gray = to_gray(ImageOps.exif_transpose(img))
    W, H = gray.size
    h, w = (min(W, H),) * 2 if crop else (H, W)
    top, left = (H - h) // 2, (W - w) // 2
    heat = F.interpolate(cam[None, None].float(), size=(h, w), mode="bilinear",
                         align_corners=False)[0, 0].clamp(0, 1).numpy()
    out = np.asarray(gray.convert("RGB"), dtype=np.float32).copy()
    win = out[top:top + h, left:left + w]
    win[:] = (1 - alpha) * win + alpha * jet(heat).astype(np.float32)
    Image.fromarray(out.round().astype(np.uint8)).save(path)


def make_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=Help)
    p.add_argument("checkpoint", help="a run folder or a .pt checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--cam", default="", help="folder for Grad-CAM overlays (default: none)")
    p.add_argument("--size", type=int, default=0, help="image size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="films per batch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=devices.PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU; logits and Grad-CAM "
                   "are fp32 either way")
    p.add_argument("--channels-last", default="auto", choices=devices.SWITCHES,
                   help="NHWC memory layout: auto (on CUDA only) | on | off")
    return p


def main(argv=None):
    p = make_parser()
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.size < 0:
        p.error(f"--batch-size {a.batch_size} --size {a.size}: give a batch of 1 or more and "
                "a size of 0 (the model's) or more")

    model, ck = load_checkpoint(a.checkpoint)
    classes, size = ck["classes"], a.size or ck.get("size") or 224
    crop = ck.get("config", {}).get("resize", "squish") == "crop"
    dev = devices.pick_device(a.device)
    amp, cl = devices.precision(dev, a.precision), devices.channels_last(dev, a.channels_last)
    model = model.to(dev, memory_format=torch.channels_last if cl else torch.preserve_format)
    model.eval()
    files, pixels, hw, skipped = [], [], [], []
    todo = find_files(a.images)
    store = stored_size(size, "crop" if crop else "squish", film_aspect(todo))
    for f in todo:
        r = decode(f, [store])
        if isinstance(r, str):  # not an image, or unreadable
            skipped.append((f, r))
        else:
            files.append(f)
            pixels.append(r[1][0])
            hw.append(r[0][1] / r[0][0])
    for f, why in skipped:
        print(f"skipped {f}: {why}")
    if not files:
        raise SystemExit("no readable images among " + ", ".join(a.images))
    images = torch.from_numpy(np.stack(pixels))[:, None].to(dev)  # (N, 1, T, T) uint8
    hw = torch.tensor(hw, device=dev) if crop else None
    batches = eval_batches(images, size, hw, a.batch_size, channels_last=cl)
    probs = class_logits(model, model, batches, amp).softmax(1).cpu()

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted"] + [f"p_{c}" for c in classes])
        for path, pr in zip(files, probs.tolist()):
            w.writerow([path, classes[max(range(len(pr)), key=pr.__getitem__)]] +
                       [f"{v:.6f}" for v in pr])
    if a.cam:
        os.makedirs(a.cam, exist_ok=True)
        for k, path in enumerate(files):
            x = view(images[k:k + 1].float() / 255, size, None if hw is None else hw[k:k + 1])
            cam = gradcam(model, normalize(x, cl), int(probs[k].argmax())).cpu()
            stem = os.path.splitext(os.path.basename(path))[0]
            save_cam(os.path.join(a.cam, f"{stem}_cam.png"), path, cam, crop)
    print(f"{len(files)} images predicted, {len(skipped)} skipped; wrote {a.out}"
          + (f" and heat maps in {a.cam}" if a.cam else ""))
    return files, probs, skipped


if __name__ == "__main__":
    main()
