"""export.py: a TorchScript file with the preprocessing inside, matching the checkpoint's model
on the same input, films of any size, and a body that torchvision's ResNet loads."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import export
import predict
from data import normalize
from machinery import phantom
from model import build_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation


def write_checkpoint(folder, resize):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    folder.mkdir()
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES, "size": 32,
                "config": {"arch": "resnet18", "resize": resize}}, folder / "model.pt")
    return folder / "model.pt"


def reference(model, film, size, crop):
    """The checkpoint's model on the film resized as export.py documents, written out here."""
    x = film[None, None].float() / 255
    h, w = film.shape
    if crop:
        nh, nw = round(h * size / min(h, w)), round(w * size / min(h, w))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True)
        x = x[..., (nh - size) // 2:(nh - size) // 2 + size, (nw - size) // 2:][..., :size]
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    with torch.no_grad():
        return model.eval()(normalize(x)).softmax(1)[0]


@pytest.mark.parametrize("resize", ["crop", "squish"])
def test_the_export_matches_the_checkpoint_and_takes_any_size(tmp_path, resize):
    path = write_checkpoint(tmp_path / "run", resize)
    ts_path, classes_path, body_path, card_path = export.main([str(path.parent)])
    card = open(card_path).read()  # a checkpoint alone: its card has no test metrics
    assert "Not a medical device" in card and "None with this card" in card
    with open(classes_path) as f:
        assert json.load(f) == {"classes": phantom.CLASSES, "size": 32, "resize": resize,
                                "arch": "resnet18"}
    if resize == "crop":  # loaded in a process with torch alone, without this project's code
        code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
                "print(m(torch.full((70, 90), 100, dtype=torch.uint8)).sum().item())")
        out = subprocess.run([sys.executable, "-c", code, ts_path], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 0 and abs(float(out.stdout.split()[-1]) - 1) < 1e-5, out.stderr
    ts = torch.jit.load(ts_path)
    clf = predict.Classifier.load(str(path), device="cpu")
    for shape in [(70, 90), (90, 70), (32, 32), (300, 200)]:
        film = torch.from_numpy(np.array(Image.fromarray(phantom.render(
            "viral", np.random.default_rng(0), 256)).resize(shape[::-1])))
        film[0, 0], film[0, 1] = 0, 255  # its whole range used, as 16 bits will be
        p = ts(film)[0]
        assert torch.allclose(p, reference(clf.model, film, 32, resize == "crop"), atol=1e-5)
        assert torch.allclose(ts(film.to(torch.int32) * 257)[0], p, atol=1e-5)  # 16-bit
        # predict.py resamples with Pillow: the same film, a little differently
        q = torch.tensor(list(clf.predict(film.numpy()).values()))
        assert (p - q).abs().max() < 0.05
    films = torch.stack([film, film.flip(-1)])[:, None]  # (N, 1, H, W): a batch
    assert ts(films).shape == (2, 4)
    r = torchvision.models.resnet18()
    missing, unexpected = r.load_state_dict(torch.load(body_path), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert torch.equal(r.layer4[1].conv2.weight, clf.model.body[7][1].conv2.weight.cpu())


def test_an_export_where_nothing_can_be_written_is_one_line(tmp_path):
    ck = write_checkpoint(tmp_path / "run", "squish")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(export.DataError, match=r"--out .*a-file.*: cannot write there \(.*\); "
                       "choose another --out"):
        export.main([str(ck), "--out", str(tmp_path / "a-file" / "export")])
