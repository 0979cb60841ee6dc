"""Shortcut tests: films with the lungs hidden or alone (--hide), sources held out
(--test-sources), and what the API, evaluate.py and compare.py make of them."""
import json
import os

import numpy as np
import pytest
import torch

import compare
import data
import evaluate
from machinery import audit, datasets, films, phantom, shortcuts
from machinery.config import parse_args
from machinery.datasets import DataError
from machinery.run import read_data
from model import build_model
from predict import Classifier

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cxr-sample")
needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE),
                                  reason="../shared/data/cxr-sample absent")
BOX = 0.75


def box_mask(n, T, grow):
    """(n, 1, T, T) uint8: 255 in the central box of a T-px stored film, grown by `grow` px
    (shrunk where negative), 0 elsewhere: where --hide's box lies, give or take resampling."""
    m = np.zeros((n, 1, T, T), np.uint8)
    a = round(T * (1 - BOX) / 2) - grow
    m[..., a:T - a, a:T - a] = 255
    return m


def seen(images, size, hw, train):
    """What the model sees of uint8 films (N, 1, T, T), in [0, 1]: one training batch
    (augmented, seed fixed: the same draws whatever the films hold) or evaluation's view."""
    if train:
        batches = data.Batches(images, torch.zeros(len(images), dtype=torch.long), len(images),
                               size, aug=data.Augment(), hw=hw, seed=3)
        x = next(iter(batches.epoch(0)))[0]
    else:
        x = next(data.eval_batches(images, size, hw, len(images)))[0]
    return x[:, 0] * data.STD[0] + data.MEAN[0]  # the normalisation undone (first channel)


@needs_sample
@pytest.mark.parametrize("mode", ["crop", "squish"])
def test_the_hidden_box_is_black_in_every_view_and_nothing_else_changes(mode):
    """Train (fastai's augmentation, random crop) and evaluation (centre crop), 32 and 64 px:
    where the box lies the films are black; beyond its edge (2 stored px either way for the
    resampling), the very pixels of the whole films. grid_sample is linear, so a mask film
    drawn through the same views says which pixels those are."""
    _, splits = datasets.load_dataset(SAMPLE)
    items = splits["test"].subset(range(12))  # films of all three classes and four sources
    for size in (32, 64):
        whole, lungs, alone = (films.load_pixels(items, [size], None, mode, hidden=(h, BOX))
                               for h in ("none", "lungs", "outside"))
        assert not np.array_equal(whole.images[size], lungs.images[size])
        T, hw = whole.images[size].shape[-1], whole.hw if mode == "crop" else None
        for train in (True, False):
            def view(f):  # uint8 films (N, 1, T, T), numpy
                return seen(torch.from_numpy(np.ascontiguousarray(f)), size, hw, train)
            x, x_lungs, x_alone = view(whole.images[size]), view(lungs.images[size]), \
                view(alone.images[size])
            inside = view(box_mask(len(items), T, -2)) > 0.999  # wholly in the box
            outside = view(box_mask(len(items), T, 2)) < 1e-3  # wholly beyond it
            assert inside.float().mean() > 0.2 and outside.float().mean() > 0.05, (size, train)
            assert x_lungs[inside].abs().max() < 1e-3  # black (lighting maps 0 to ~2e-6)
            assert torch.allclose(x_lungs[outside], x[outside], atol=1e-5)
            assert x_alone[outside].abs().max() < 1e-3
            assert torch.allclose(x_alone[inside], x[inside], atol=1e-5)
            assert x[inside].mean() > 0.1  # the whole films are not black there


def test_phantoms_are_hidden_too_and_cached_films_apart(tmp_path):
    _, splits = datasets.phantom_dataset(16)
    whole, lungs = (films.load_pixels(splits["train"], [32], None, "squish", hidden=(h, 0.5))
                    for h in ("none", "lungs"))
    assert (lungs.images[32][..., 9:23, 9:23] == 0).all()
    assert whole.images[32][..., 9:23, 9:23].mean() > 20
    assert films.fingerprint(["a.png"], "crop") != films.fingerprint(["a.png"], "crop",
                                                                     ("lungs", BOX))
    assert films.fingerprint(["a.png"], "crop", ("lungs", 0.5)) != films.fingerprint(
        ["a.png"], "crop", ("lungs", BOX))


@needs_sample
def test_a_hidden_run_checks_duplicates_on_the_whole_films(tmp_path):
    """Blacked-out films all look alike to the perceptual hash: on the sample's hidden films
    it finds 34 of the 47 test films 'copied' in training (measured); on whole films none."""
    cfg = parse_args(["--data", SAMPLE, "--hide", "lungs", "--stages", "32", "--cache-dir",
                      str(tmp_path), "--val-frac", "0"])
    classes, items, split_films, leaks = read_data(cfg, [32])
    assert leaks["test_films_with_duplicate_in_train"] == 0
    assert (split_films["test"].images[32][:, :, 12:20, 12:20] == 0).all()  # trains hidden
    th = {k: films.load_pixels(items[k], [32], None, "crop", hidden=("lungs", BOX))
          for k in ("train", "test")}
    found = audit.leaks(audit.thumbs(th["train"].images[32]), audit.thumbs(
        th["test"].images[32]), items["train"], items["test"], True, None, classes)
    assert found["test_films_with_duplicate_in_train"] > 20


@needs_sample
def test_test_sources_hold_out_whole_sources_or_refuse_saying_why():
    classes, s = datasets.load_dataset(SAMPLE, test_sources="figure1")
    assert set(s["test"].sources) == {"figure1"} and len(s["test"]) == 39
    assert "figure1" not in s["train"].sources and len(s["train"]) == 239 - 39 - 1
    assert "cohen_36" not in s["train"].patients  # filed under cohen and figure1: tested only
    with pytest.raises(DataError, match=r"COVID-19 would have no training film left \(all "
                       r"its films come from actualmed, cohen, figure1\)\. A model cannot"):
        datasets.load_dataset(SAMPLE, test_sources="actualmed,cohen,figure1")
    with pytest.raises(DataError, match=r"no source nope in the split files \(theirs: "
                       r"actualmed, cohen, figure1, kermany, nih\)"):
        datasets.load_dataset(SAMPLE, test_sources="nope")
    with pytest.raises(DataError, match="phantoms have one source"):
        datasets.load_dataset("phantom", test_sources="phantom")


def test_the_audit_says_which_sources_can_be_held_out():
    v1 = {"cohen": {"COVID-19": 76, "bacterial": 5, "viral": 13, "normal": 0},
          "kermany": {"COVID-19": 0, "bacterial": 2781, "viral": 1491, "normal": 1583}}
    assert shortcuts.sources_to_hold_out(v1) == {"cohen": ["COVID-19"], "kermany": ["normal"]}


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    os.makedirs(tmp_path / "run")
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES, "size": 32,
                "config": {"arch": "resnet18", "resize": "squish", "data": "phantom",
                           "phantoms": 40}}, tmp_path / "run" / "model.pt")
    return tmp_path / "run"


def test_the_api_and_evaluate_hide_as_asked_or_as_trained(run_dir):
    film = (np.random.default_rng(0).random((80, 60)) * 255).astype(np.uint8)
    plain, lungs = Classifier.load(run_dir), Classifier.load(run_dir, hide="lungs")
    px, _ = lungs.prepare(film)
    assert plain.hidden[0] == "none" and (px[8:-8, 8:-8] == 0).all() and px[:2].mean() > 50
    hidden_film = shortcuts.hide(film, "lungs", BOX)
    assert np.array_equal(px, plain.prepare(hidden_film)[0])  # one box, wherever it is drawn
    assert not torch.allclose(lungs.probabilities([film]), plain.probabilities([film]))
    with pytest.raises(ValueError, match="give one of none, lungs, outside"):
        Classifier.load(run_dir, hide="lung")
    m = evaluate.main([str(run_dir), "--data", "phantom", "--hide", "lungs", "--cache-dir", ""])
    assert m["hide"] == "lungs" and m["hide_box"] == BOX
    out = run_dir / "eval_phantom_test_hide-lungs"
    assert "films with the lungs hidden" in open(out / "metrics.md").read()
    ck = torch.load(run_dir / "model.pt", weights_only=True)  # a model trained on them:
    ck["config"].update(hide="outside", hide_box=0.5)  # evaluated on them, unless told
    torch.save(ck, run_dir / "model.pt")
    assert Classifier.load(run_dir).hidden == ("outside", 0.5)
    assert Classifier.load(run_dir, hide="none").hidden == ("none", 0.5)


def test_compare_sets_each_group_against_chance(tmp_path):
    truth = {f"f{i}": c for i, c in enumerate(["COVID-19"] * 5 + ["normal"] * 3 + ["viral"] * 2)}
    assert compare.chance(truth) == {"always": "COVID-19", "accuracy": 0.5,
                                     "balanced_accuracy": pytest.approx(1 / 3)}
