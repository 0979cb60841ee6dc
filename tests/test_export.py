"""export.py: a torch.export program with the API's preprocessing inside, giving the API's
answer for a film in every form it may come in, run by torch alone; a body torchvision's ResNet
loads."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import export
import predict
from machinery import phantom
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "cxr-sample", "test")
FILMS = ["actmed_1722810170.20200320183426328780.jpg", "kermany_IM-0217-0001.jpg",
         "nih_00001880_000.jpg"]


def write_checkpoint(folder, resize, size=32):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    folder.mkdir(exist_ok=True)
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES, "size": size,
                "config": {"arch": "resnet18", "resize": resize}}, folder / "model.pt")
    return folder / "model.pt"


@pytest.mark.parametrize("resize", ["crop", "squish"])
def test_the_export_runs_with_torch_alone_and_answers_as_the_api(tmp_path, resize):
    path = write_checkpoint(tmp_path / "run", resize)
    pt2, classes_path, body_path, card_path = export.main([str(path.parent)])
    card = open(card_path).read()  # a checkpoint alone: its card has no test metrics
    assert "Not a medical device" in card and "None with this card" in card
    with open(classes_path) as f:
        assert json.load(f) == {"classes": phantom.CLASSES, "size": 32, "resize": resize,
                                "arch": "resnet18", "input": "uint8 (1, H, W)"}
    clf = predict.Classifier.load(str(path), device="cpu")
    films = [np.array(Image.fromarray(phantom.render("viral", np.random.default_rng(0), 256))
                      .resize(shape[::-1])) for shape in [(70, 90), (90, 70), (32, 32), (300, 200)]]
    films = [torch.from_numpy(f)[None] for f in films]  # (1, H, W), as read_image gives them
    if resize == "crop":  # a fresh interpreter, in another folder, without this project
        torch.save(films, tmp_path / "films.pt")
        code = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); "
                "films = torch.load('films.pt'); torch.save([m(f) for f in films], 'p.pt'); "
                "m(films[0].float())")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([sys.executable, "-c", code, pt2], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
        assert "dtype mismatch! Expected: Byte, Got: float" in out.stderr  # what it expects
        probs = torch.load(tmp_path / "p.pt")
    else:
        with torch.no_grad():
            probs = [torch.export.load(pt2).module()(f) for f in films]
    for p, film in zip(probs, films):
        assert p.shape == (1, 4)
        assert (p[0] - clf.probabilities([film])[0]).abs().max() < 1e-4
    r = torchvision.models.resnet18()
    missing, unexpected = r.load_state_dict(torch.load(body_path), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert torch.equal(r.layer4[1].conv2.weight, clf.model.body[7][1].conv2.weight.cpu())


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/data/cxr-sample absent")
@pytest.mark.parametrize("size", [64, 224, 512])
def test_one_film_one_answer_whatever_form_it_comes_in(tmp_path, size):
    """Real films as a path, a PIL image, a uint8 array, (H, W) and (1, H, W) tensors, a float
    tensor in [0, 1] (to_tensor's) and through the exported program: one answer, within 1e-4.
    Another film's answer differs by far more: for this untrained ResNet-18, the first film's
    from the second's and third's by 0.091 and 0.0061 at 64 px, 0.031 and 0.0064 at 224, 0.051
    and 0.016 at 512 (measured 2026-12-05; the test asks for 1e-3)."""
    path = write_checkpoint(tmp_path / "run", "crop", size)
    model = torch.export.load(export.export(str(path.parent), str(tmp_path / "e"))[0]).module()
    clf = predict.Classifier.load(str(path), device="cpu")
    answers = []
    for name in FILMS:
        file = os.path.join(SAMPLE, name)
        with Image.open(file) as img:
            img.load()
        a = np.array(img.convert("L"))
        forms = [file, img, a, torch.from_numpy(a), torch.from_numpy(a)[None],
                 torch.from_numpy(a).float() / 255]
        p = clf.probabilities(forms)
        with torch.no_grad():
            p = torch.cat([p, model(torch.from_numpy(a)[None])])  # as read_image gives it
        assert (p - p[0]).abs().max() < 1e-4, (name, (p - p[0]).abs().max(1).values)
        answers.append(p[0])
    assert min((answers[0] - b).abs().max() for b in answers[1:]) > 1e-3  # films differ


def test_floats_are_intensities_in_0_1_and_nothing_else(tmp_path):
    clf = predict.Classifier.load(str(write_checkpoint(tmp_path / "run", "crop")), device="cpu")
    film = np.random.default_rng(0).random((60, 50)).astype(np.float32)
    dark = clf.predict(film * 0.5)  # no longer stretched over its range: a darker film
    assert max(abs(dark[c] - clf.predict(film)[c]) for c in phantom.CLASSES) > 1e-3
    near = clf.predict(np.clip(film + 0.001, 0, 1.001))  # resampling's overshoot: taken
    assert max(abs(near[c] - clf.predict(film)[c]) for c in phantom.CLASSES) < 0.05
    with pytest.raises(predict.FilmError, match=r"float pixels from 0\.\d+ to 254\.\d+: a "
                       r"float film holds intensities in \[0, 1\] \(divide 8-bit values by 255"):
        clf.predict(film * 255)


def test_an_export_where_nothing_can_be_written_is_one_line(tmp_path):
    ck = write_checkpoint(tmp_path / "run", "squish")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(export.DataError, match=r"--out .*a-file.*: cannot write there \(.*\); "
                       "choose another --out"):
        export.main([str(ck), "--out", str(tmp_path / "a-file" / "export")])
