"""predict.py: CSV for the readable images, skipped files listed, Grad-CAM overlays."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from machinery import datasets, films, phantom
import predict
from model import build_model
from test_datasets import make_covidx


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    path = tmp_path / "model.pt"
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES,
                "config": {"arch": "resnet18"}, "size": 64}, path)
    return path


def test_gradcam_shape_range_and_target():
    torch.manual_seed(0)
    model = build_model(4, "none", "resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    cams = [predict.gradcam(model, x, t) for t in range(4)]
    assert cams[0].shape == (2, 2)  # layer4 is 1/32 of the input
    for cam in cams:
        assert cam.min() >= 0 and cam.max() <= 1
    assert any(not torch.allclose(cams[0], c) for c in cams[1:])  # depends on the class
    assert all(p.grad is None for p in model.parameters())  # the weights are left alone


def test_predict_folder_with_bad_files(checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i, c in enumerate(["normal", "viral"]):
        Image.fromarray(phantom.render(c, rng)).resize((90, 70)).save(folder / f"{c}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("a note")
    out = tmp_path / "out" / "p.csv"
    files, probs, skipped = predict.main([str(checkpoint), str(folder), "--out", str(out),
                                          "--cam", str(tmp_path / "cams")])
    assert [os.path.basename(f) for f in files] == ["normal.png", "viral.png"]
    assert sorted(os.path.basename(f) for f, _ in skipped) == ["corrupt.png", "notes.txt"]
    said = capsys.readouterr().out
    assert "skipped" in said and str(out) in said  # where it wrote, the full path
    assert "% " in said and "normal.png" in said  # a first look at the predictions
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and rows[0]["predicted"] in phantom.CLASSES
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in phantom.CLASSES) - 1) < 1e-4
    cam = Image.open(tmp_path / "cams" / "normal_cam.png")
    # the radiograph's own size, and a strip below it for the caption and the colour bar
    assert cam.size == (90, 70 + 30) and cam.mode == "RGB"
    assert len(np.unique(np.asarray(cam.convert("L"))[:70])) > 10
    strip = np.asarray(cam)[70:].astype(int)
    assert (strip[..., 0] - strip[..., 2] > 100).any() and (strip[..., 2] - strip[..., 0] > 100
                                                             ).any()  # the bar: red and blue


def test_predict_with_no_readable_image_is_an_error(checkpoint, tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(predict.FilmError, match="no readable images"):
        predict.main([str(checkpoint), str(tmp_path / "a.txt"), "--out",
                      str(tmp_path / "p.csv")])


def test_a_crop_model_sees_and_maps_the_centre_square(tmp_path):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    ck = tmp_path / "crop.pt"
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES,
                "config": {"arch": "resnet18", "resize": "crop"}, "size": 64}, ck)
    img = tmp_path / "wide.png"
    Image.fromarray(phantom.render("viral", np.random.default_rng(1))).resize((90, 70)).save(img)
    files, probs, _ = predict.main([str(ck), str(img), "--out", str(tmp_path / "p.csv"),
                                    "--cam", str(tmp_path / "cams")])
    cam = np.asarray(Image.open(tmp_path / "cams" / "wide_cam.png")).astype(int)[:70]
    assert cam.shape == (70, 90, 3)
    gray = lambda a: (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert gray(cam[:, :10]) and gray(cam[:, 80:])  # the 10 px each side the model did not see
    assert not gray(cam[:, 10:80])  # the heat map over the 70x70 centre square


def test_the_python_api_takes_any_film_and_answers_by_class_name(checkpoint, tmp_path):
    clf = predict.Classifier.load(str(checkpoint), device="cpu")
    rng = np.random.default_rng(2)
    film = phantom.render("viral", rng)  # uint8 (256, 256), its whole range used
    film[0, 0], film[0, 1] = 0, 255
    path = tmp_path / "film.png"
    Image.fromarray(film).save(path)
    p = clf.predict(str(path))
    assert list(p) == phantom.CLASSES and abs(sum(p.values()) - 1) < 1e-5
    same = [Image.fromarray(film), film, film.astype(np.uint16) * 257,
            torch.from_numpy(film).float() / 255, torch.from_numpy(film)[None].repeat(3, 1, 1),
            np.stack([film] * 3, -1), film[None], np.stack([film] * 3).astype(np.float32) / 255]
    for q in clf.predict(same):  # PIL, 8 and 16 bits, floats, CHW and HWC colour: one film
        assert all(abs(q[c] - p[c]) < 1e-5 for c in phantom.CLASSES)
    big = clf.predict(Image.fromarray(film).resize((512, 512)))  # any size, resized as trained
    assert max(abs(big[c] - p[c]) for c in phantom.CLASSES) < 0.05
    predict.main([str(checkpoint), str(path), "--out", str(tmp_path / "p.csv")])  # the same
    row, = csv.DictReader(open(tmp_path / "p.csv"))
    assert all(abs(float(row[f"p_{c}"]) - p[c]) < 1e-5 for c in phantom.CLASSES)
    heat, label = clf.gradcam(str(path))
    assert label == max(p, key=p.get) and heat.shape == (2, 2)
    assert 0 <= heat.min() <= heat.max() <= 1
    assert clf.gradcam(film, target="normal")[1] == "normal"
    with pytest.raises(ValueError, match="'flu' is not one of the model's classes"):
        clf.gradcam(film, target="flu")


def test_the_api_raises_errors_that_name_the_input(checkpoint, tmp_path):
    clf = predict.Classifier.load(str(checkpoint), device="cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(predict.FilmError, match="bad.png: not a readable film"):
        clf.predict(str(bad))
    with pytest.raises(predict.FilmError, match="a ndarray: not a readable film .*shape"):
        clf.predict(np.zeros((2, 3, 4, 5)))
    with pytest.raises(predict.CheckpointError, match="no such checkpoint"):
        predict.Classifier.load(str(tmp_path / "none.pt"))


def test_heat_maps_of_same_named_files_and_of_a_chosen_class(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(phantom.render("normal", rng)).save(tmp_path / "in" / sub / "x.png")
    cams = tmp_path / "cams"
    predict.main([str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "p.csv"),
                  "--cam", str(cams), "--cam-class", "viral"])
    assert sorted(os.path.relpath(os.path.join(d, f), cams) for d, _, fs in os.walk(cams)
                  for f in fs) == ["a/x_cam.png", "b/x_cam.png"]  # neither overwrites the other
    with pytest.raises(SystemExit):
        predict.main([str(checkpoint), str(tmp_path / "in"), "--out", str(tmp_path / "q.csv"),
                      "--cam", str(cams), "--cam-class", "flu"])
    assert not (tmp_path / "q.csv").exists()  # refused before any work


def test_films_with_nan_or_infinite_pixels_are_no_films(checkpoint, tmp_path, capsys):
    """A NaN blanked the range stretch: a black film, and confident probabilities for it. Now
    the API raises a FilmError, predict.py skips the file by name, and training's data check
    (decode) lists it, as it lists an unreadable file."""
    clf = predict.Classifier.load(str(checkpoint), device="cpu")
    one = np.random.default_rng(0).random((60, 50)).astype(np.float32)
    one[3, 4] = np.nan
    for film, n in [(one, 1), (np.full((60, 50), np.nan), 3000),
                    (torch.full((1, 60, 50), float("inf")), 3000)]:
        with pytest.raises(predict.FilmError, match=f"{n} of its 3000 pixels are NaN or "
                                                     "infinite"):
            clf.predict(film)
    assert clf.predict(np.nan_to_num(one)).keys() == set(phantom.CLASSES)  # the rest is a film
    with pytest.raises(predict.FilmError, match="no films given"):
        clf.predict([])
    Image.fromarray(one).save(tmp_path / "nan.tif")  # a float TIFF
    Image.fromarray((np.nan_to_num(one) * 255).astype(np.uint8)).save(tmp_path / "ok.png")
    files, _, skipped = predict.main([str(checkpoint), str(tmp_path / "nan.tif"),
                                      str(tmp_path / "ok.png"), "--out", str(tmp_path / "p.csv")])
    assert [os.path.basename(f) for f in files] == ["ok.png"]
    assert [(os.path.basename(f), "NaN or infinite" in why) for f, why in skipped] == [
        ("nan.tif", True)]
    assert "skipped" in capsys.readouterr().out
    assert "1 of its 3000 pixels are NaN" in films.decode(str(tmp_path / "nan.tif"), [32])


def test_a_film_with_no_contrast_is_said(checkpoint, tmp_path, capsys):
    clf = predict.Classifier.load(str(checkpoint), device="cpu")
    with pytest.warns(UserWarning, match="a ndarray: no contrast at all .*not a film"):
        clf.predict(np.full((60, 50), 7, np.uint8))
    make_covidx(tmp_path / "d")  # training's films: one blank among them
    Image.new("L", (40, 40), 128).save(tmp_path / "d" / "train" / "train2.png")
    _, splits = datasets.load_dataset(str(tmp_path / "d"))
    films.load_pixels(splits["train"], [16])
    assert "1 of 6 images have no contrast at all (every pixel alike: not a film?), e.g. " in \
        capsys.readouterr().out
