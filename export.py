"""Export a trained model: one self-contained file that classifies a film tensor of any size.

    python export.py runs/NAME       # -> runs/NAME/export/: model.ts, body.pth, MODEL_CARD.md
    python export.py runs/NAME/model.pt --out deploy/

model.ts is TorchScript: `torch.jit.load("model.ts")(film)` needs torch alone, not this code
(torch 2.14 calls TorchScript deprecated, in favour of torch.export, and still loads and runs it;
torch.export's shapes are fixed unless declared, and a film's size is the point here).
`film` is a grayscale tensor, (H, W) or (N, 1, H, W) of one size, of any size: uint8 is read as
0..255; any other dtype (16-bit, float) has its used range stretched to 0..1, as training
decoded such films. Inside: the resize of training (--resize crop: shorter side to the model's
size and the centre square, as fastai v1 validates; squish: the whole film), ImageNet
normalisation, the network and a softmax. Out: probabilities (N, classes), in the order of
classes.json, written beside it with the size.

The resize is torch's (bilinear, antialiased), not Pillow's as in predict.py and training's
decoding, so probabilities differ from predict.py's by the resampling: measured in
tests/test_export.py. body.pth is the ResNet body as a state dict that torchvision's ResNet of
the same --arch loads (`load_state_dict(sd, strict=False)`: only its own fc is left out).
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import MEAN, STD
from machinery.checkpoint import CheckpointError, load_checkpoint, run_dir_of
from machinery.config import Help
from machinery.datasets import DataError, run_cli
from machinery.modelcard import model_card, write_model_card
from machinery.shortcuts import NOT_A_CLASSIFIER, Hidden

# body.N of our model -> the torchvision ResNet's attribute (model.COVIDResNet's Sequential)
BODY_NAMES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


class Exported(nn.Module):
    """The trained body and head with training's evaluation preprocessing in front."""

    def __init__(self, model, size: int, crop: bool):
        super().__init__()
        self.body, self.head = model.body, model.head
        self.size, self.crop = size, crop
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, film: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.probabilities(film)

    def probabilities(self, film: torch.Tensor) -> torch.Tensor:
        x = film[None, None] if film.dim() == 2 else film  # (N, 1, H, W)
        if x.dtype == torch.uint8:
            x = x.float() / 255
        else:  # 16-bit or float: the used range, stretched (films.to_gray)
            x = x.float()
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
        h, w = x.shape[-2], x.shape[-1]
        if self.crop:  # shorter side to the size, then the centre square
            nh = max(self.size, int(round(h * self.size / min(h, w))))
            nw = max(self.size, int(round(w * self.size / min(h, w))))
            x = F.interpolate(x, size=[nh, nw], mode="bilinear", align_corners=False,
                              antialias=True)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[:, :, top:top + self.size, left:left + self.size]
        else:
            x = F.interpolate(x, size=[self.size, self.size], mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std  # (N, 3, size, size): broadcasting makes 3 channels
        return self.head(self.body(x).float()).softmax(1)


def body_state_dict(model):
    """Our body's weights under torchvision's ResNet names (body.4.0.conv1 -> layer1.0.conv1)."""
    return {f"{BODY_NAMES[int(k.split('.')[1])]}.{k.split('.', 2)[2]}": v.clone()
            for k, v in model.state_dict().items() if k.startswith("body.")}


def export(checkpoint, out, allow_unfinished=False):
    """Write out/model.ts, out/classes.json, out/body.pth and out/MODEL_CARD.md; return their
    paths. An unfinished run's last.pt is refused unless allow_unfinished (its card says so)."""
    model, ck = load_checkpoint(checkpoint, allow_unfinished)
    trained = ck.get("config", {})
    if Hidden.of(trained):  # model.ts would see whole films: other scores
        raise CheckpointError(f"{checkpoint} was trained on {Hidden.of(trained).note()}: "
                              f"{NOT_A_CLASSIFIER}, so there is nothing to deploy "
                              "(evaluate.py measures it)")
    crop = trained.get("resize", "squish") == "crop"
    size = ck.get("size") or 224
    scripted = torch.jit.script(Exported(model.eval(), size, crop).eval())
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f) for f in ("model.ts", "classes.json", "body.pth")]
    scripted.save(paths[0])
    with open(paths[1], "w") as f:
        json.dump({"classes": ck["classes"], "size": size, "resize": "crop" if crop else
                   "squish", "arch": ck["config"]["arch"]}, f, indent=1)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("checkpoint", help="a run folder or a .pt checkpoint")
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
    print("wrote " + ", ".join(paths) + "\nuse: probs = torch.jit.load(model.ts)(film), "
          "film a grayscale tensor (H, W) of any size")
    return paths


if __name__ == "__main__":
    run_cli(main)

