"""Export a trained model: one file, in torch's own format, that classifies a film of any size.

    python export.py runs/NAME                    # -> runs/NAME/export/
    python export.py runs/NAME/model.pt --out deploy/

Writes model.pt2, classes.json, body.pth and MODEL_CARD.md.

model.pt2 is a torch.export program: it needs torch alone, not this code.

    model = torch.export.load("model.pt2").module()
    film = torchvision.io.read_image("film.png", torchvision.io.ImageReadMode.GRAY)
    probs = model(film)     # (1, classes), in the order of classes.json

Its input is one 8-bit grayscale film, a uint8 tensor (1, H, W) of any height and width (a
torch.export program takes one dtype and rank: other films are refused by torch, naming what it
expects; the API, predict.Classifier, takes any kind and converts it as its docs say). Inside,
the very preprocessing of the API and of training's evaluation (films.square, data.view,
data.normalize: the film squished to the stored square, its centre crop with --resize crop,
ImageNet's normalisation), the network and a softmax: the same film gives the API's
probabilities (tests/test_export.py: within 1e-4). body.pth is the ResNet body as a state dict
that torchvision's ResNet of the same --arch loads (`load_state_dict(sd, strict=False)`: only
its own fc is left out).
"""
import argparse
import json
import os

import torch
import torch.nn as nn

from data import normalize, view
from machinery.checkpoint import CheckpointError, load_checkpoint, run_dir_of
from machinery.flags import Help
from machinery.datasets import DataError, run_cli
from machinery.films import CROP_MARGIN, square, stored_size
from machinery.modelcard import model_card, write_model_card
from machinery.shortcuts import NOT_A_CLASSIFIER, Hidden

# body.N of our model -> the torchvision ResNet's attribute (model.COVIDResNet's Sequential)
BODY_NAMES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
HEIGHT, WIDTH = (torch.export.Dim(side, min=8, max=1 << 15) for side in ("height", "width"))


class Exported(nn.Module):
    """The trained model with the API's preprocessing in front (predict.Classifier: prepare,
    then probabilities_of): a uint8 film (1, H, W) -> probabilities (1, classes)."""

    def __init__(self, model, size, crop):
        super().__init__()
        self.model, self.size, self.crop = model, size, crop
        self.store = stored_size(size, "crop" if crop else "squish", CROP_MARGIN)

    def forward(self, film):
        x = square(film[None], self.store).float() / 255  # (1, 1, T, T), as the API stores it
        hw = film.new_ones(1, dtype=torch.float32) * film.shape[1] / film.shape[2] \
            if self.crop else None
        return self.model(normalize(view(x, self.size, hw))).softmax(1)


def body_state_dict(model):
    """Our body's weights under torchvision's ResNet names (body.4.0.conv1 -> layer1.0.conv1)."""
    return {f"{BODY_NAMES[int(k.split('.')[1])]}.{k.split('.', 2)[2]}": v.clone()
            for k, v in model.state_dict().items() if k.startswith("body.")}


def export(checkpoint, out, allow_unfinished=False):
    """Write out/model.pt2, out/classes.json, out/body.pth and out/MODEL_CARD.md; return their
    paths. An unfinished run's last.pt is refused unless allow_unfinished (its card says so)."""
    model, ck = load_checkpoint(checkpoint, allow_unfinished)
    trained = ck.get("config", {})
    if Hidden.of(trained):  # model.pt2 would see whole films: other scores
        raise CheckpointError(f"{checkpoint} was trained on {Hidden.of(trained).note()}: "
                              f"{NOT_A_CLASSIFIER}, so there is nothing to deploy "
                              "(evaluate.py measures it)")
    crop = trained.get("resize", "squish") == "crop"
    size = ck.get("size") or 224
    program = torch.export.export(Exported(model.eval().requires_grad_(False), size, crop),
                                  (torch.zeros(1, 300, 250, dtype=torch.uint8),),
                                  dynamic_shapes={"film": {1: HEIGHT, 2: WIDTH}})
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f) for f in ("model.pt2", "classes.json", "body.pth")]
    torch.export.save(program, paths[0])
    with open(paths[1], "w") as f:
        json.dump({"classes": ck["classes"], "size": size, "resize": "crop" if crop else
                   "squish", "arch": ck["config"]["arch"], "input": "uint8 (1, H, W)"}, f,
                  indent=1)
    torch.save(body_state_dict(model), paths[2])
    run_dir = run_dir_of(checkpoint)
    if os.path.isfile(os.path.join(run_dir, "config.json")):  # the run's card, metrics and all
        paths.append(write_model_card(run_dir, out, size, ck["weights"]))
    else:  # a checkpoint alone: what it knows
        paths.append(os.path.join(out, "MODEL_CARD.md"))
        with open(paths[-1], "w") as f:
            f.write(model_card(ck["config"], ck["classes"], size, weights=ck["weights"]))
    return paths


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help,
                                usage="%(prog)s CHECKPOINT [flags below]")
    p.add_argument("checkpoint", help="a run folder (its model.pt) or a .pt checkpoint")
    p.add_argument("--out", default="", metavar="DIR",
                   help="folder to write (default: the run folder's export/)")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export the weights of an unfinished run (its last.pt) all the same; "
                   "the card says so")
    return p


def main(argv=None):
    a = make_parser().parse_args(argv)
    out = a.out or os.path.join(run_dir_of(a.checkpoint) or ".", "export")
    try:
        paths = export(a.checkpoint, out, a.allow_unfinished)
    except OSError as e:  # not a folder, no permission, a full disk: one line, not a traceback
        if not os.path.abspath(str(e.filename or "")).startswith(os.path.abspath(out)):
            raise
        raise DataError(f"--out {out}: cannot write there ({e.strerror or e}); choose another "
                        "--out") from e
    print("wrote " + ", ".join(paths) + "\nuse: probs = torch.export.load(\"model.pt2\")"
          ".module()(film), film a uint8 tensor (1, H, W) of any size")
    return paths


if __name__ == "__main__":
    run_cli(main)

