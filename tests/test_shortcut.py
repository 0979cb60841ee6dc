"""Shortcut tests: films with the lungs hidden or alone (--hide), sources held out
(--test-sources), and what the API, evaluate.py, export.py, audit.py and compare.py make of
them."""
import os

import numpy as np
import pytest
import torch

import audit as audit_script
import compare
import data
import evaluate
import export
from machinery import audit, datasets, films, phantom, shortcuts
from machinery.checkpoint import CheckpointError
from machinery.config import parse_args
from machinery.datasets import DataError
from machinery.modelcard import model_card
from machinery.report import shortcut_lines
from machinery.run import read_data
from machinery.shortcuts import Hidden
from model import build_model
from predict import Classifier

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cxr-sample")
needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE),
                                  reason="../shared/data/cxr-sample absent")
BOX = 0.75


def box_mask(hw, T, crop, grow):
    """(N, 1, T, T) uint8: 255 in --hide's box of each film stored squished to T px (hw: its
    height / width), grown by `grow` px (shrunk where negative), 0 elsewhere: where the box
    lies, give or take resampling. With crop the box is BOX of the film's shorter side."""
    m = np.zeros((len(hw), 1, T, T), np.uint8)
    for i, r in enumerate(hw.tolist()):
        rows, cols = (BOX * min(1, 1 / r), BOX * min(1, r)) if crop else (BOX, BOX)
        top, left = round(T * (1 - rows) / 2) - grow, round(T * (1 - cols) / 2) - grow
        m[i, :, top:T - top, left:T - left] = 255
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
    drawn through the same views says which pixels those are. With crop the box is BOX of the
    film's centre square: evaluation sees a border of (1 - BOX) / 2 on every side either way.
    (A box 10% smaller than films.py's fails this test.)"""
    _, splits = datasets.load_dataset(SAMPLE)
    items = splits["test"].subset(range(12))  # films of all three classes and four sources
    for size in (32, 64):
        whole, lungs, alone = (films.load_pixels(items, [size], None, mode,
                                                 hidden=Hidden(h, BOX, mode == "crop"))
                               for h in ("none", "lungs", "outside"))
        assert not np.array_equal(whole.images[size], lungs.images[size])
        T, hw = whole.images[size].shape[-1], whole.hw if mode == "crop" else None
        for train in (True, False):
            def view(f):  # uint8 films (N, 1, T, T), numpy
                return seen(torch.from_numpy(np.ascontiguousarray(f)), size, hw, train)
            x, x_lungs, x_alone = view(whole.images[size]), view(lungs.images[size]), \
                view(alone.images[size])
            inside = view(box_mask(whole.hw, T, mode == "crop", -2)) > 0.999  # wholly in it
            outside = view(box_mask(whole.hw, T, mode == "crop", 2)) < 1e-3  # wholly beyond
            assert inside.float().mean() > 0.2 and outside.float().mean() > 0.05, (size, train)
            assert x_lungs[inside].abs().max() < 1e-3  # black (lighting maps 0 to ~2e-6)
            assert torch.allclose(x_lungs[outside], x[outside], atol=1e-5)
            assert x_alone[outside].abs().max() < 1e-3
            assert torch.allclose(x_alone[inside], x[inside], atol=1e-5)
            assert x[inside].mean() > 0.1  # the whole films are not black there
            if not train:  # evaluation sees a border on all four sides, crop or squish
                assert outside[:, [0, -1]].all() and outside[:, :, [0, -1]].all()


def test_phantoms_are_hidden_too():
    _, splits = datasets.phantom_dataset(16)
    whole, lungs = (films.load_pixels(splits["train"], [32], None, "squish",
                                      hidden=Hidden(h, 0.5)) for h in ("none", "lungs"))
    assert (lungs.images[32][..., 9:23, 9:23] == 0).all()
    assert whole.images[32][..., 9:23, 9:23].mean() > 20


@needs_sample
def test_hidden_films_are_cached_apart_from_the_whole_ones(tmp_path):
    _, splits = datasets.load_dataset(SAMPLE)
    items = splits["test"].subset(range(6))
    for hidden in (Hidden(), Hidden("lungs", BOX, True), Hidden("lungs", 0.5, True),
                   Hidden()):  # whole, two boxes, then whole again: each read from its own
        got = films.load_pixels(items, [32], str(tmp_path), "crop", hidden=hidden)
        assert np.array_equal(got.images[32], films.load_pixels(
            items, [32], None, "crop", hidden=hidden).images[32])
    assert len(list(tmp_path.glob("*-32.npy"))) == 3


@needs_sample
def test_a_hidden_run_checks_duplicates_on_the_whole_films(tmp_path):
    """Blacked-out films all look alike to the perceptual hash: on the sample's hidden films
    it finds 19 of the 47 test films 'copied' in training (measured); on whole films none."""
    cfg = parse_args(["--data", SAMPLE, "--hide", "lungs", "--stages", "32", "--cache-dir",
                      str(tmp_path), "--val-frac", "0"])
    classes, items, split_films, leaks = read_data(cfg, [32])
    assert leaks["test_films_with_duplicate_in_train"] == 0
    assert (split_films["test"].images[32][:, :, 20:28, 20:28] == 0).all()  # trains hidden
    hidden = Hidden("lungs", BOX, crop=True)
    th = {k: films.load_pixels(items[k], [32], None, "crop", hidden=hidden)
          for k in ("train", "test")}
    found = audit.leaks(audit.thumbs(th["train"].images[32]), audit.thumbs(
        th["test"].images[32]), items["train"], items["test"], True, None, classes)
    assert found["test_films_with_duplicate_in_train"] > 10


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
    assert shortcuts.sources_to_hold_out(v1) == {"cohen": (["COVID-19"], ["normal"]),
                                                 "kermany": (["normal"], ["COVID-19"])}
    said = "\n".join(audit_script.shortcut_tests({"sources": v1}, "v1"))
    assert "python ablate.py --data v1 --preset shortcut" in said
    assert "possible for none; not for cohen (COVID-19 would have no training film); not for " \
        "kermany (normal would have no training film)." in said


def test_bad_hide_flags_are_refused_before_any_work(capsys):
    for flags, said in [(["--hide-box", "0.5"], "--hide-box 0.5: a box of what?"),
                        (["--hide", "lungs", "--hide-box", "0.99"], "give a share of each "
                         "side of 0.1 to 0.95")]:
        with pytest.raises(SystemExit):
            parse_args(["--data", "phantom", *flags])
        assert said in capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    m = build_model(4, "none", "resnet18")
    os.makedirs(tmp_path / "run")
    torch.save({"model": m.state_dict(), "classes": phantom.CLASSES, "size": 32,
                "config": {"arch": "resnet18", "resize": "squish", "data": "phantom",
                           "phantoms": 40}}, tmp_path / "run" / "model.pt")
    return tmp_path / "run"


def test_the_api_evaluate_and_export_hide_as_asked_or_as_trained(run_dir):
    film = (np.random.default_rng(0).random((80, 60)) * 255).astype(np.uint8)
    plain, lungs = Classifier.load(run_dir), Classifier.load(run_dir, hide="lungs")
    px, _ = lungs.prepare(film)
    assert not plain.hidden and (px[8:-8, 8:-8] == 0).all() and px[:2].mean() > 50
    hidden_film = Hidden("lungs", BOX).apply(film)
    assert np.array_equal(px, plain.prepare(hidden_film)[0])  # one box, wherever it is drawn
    assert not torch.allclose(lungs.probabilities([film]), plain.probabilities([film]))
    with pytest.raises(ValueError, match="give one of none, lungs, outside and a box of 0.1"):
        Classifier.load(run_dir, hide="lung")
    with pytest.raises(ValueError, match="a box of what"):
        Classifier.load(run_dir, hide_box=0.5)
    m = evaluate.main([str(run_dir), "--data", "phantom", "--hide", "lungs", "--cache-dir", ""])
    assert m["hide"] == "lungs" and m["hide_box"] == BOX
    out = run_dir / "eval_phantom_test_hide-lungs"
    assert "films with the lungs hidden" in open(out / "metrics.md").read()
    ck = torch.load(run_dir / "model.pt", weights_only=True)  # a model trained on them:
    ck["config"].update(hide="outside", hide_box=0.5)  # evaluated on them, unless told
    torch.save(ck, run_dir / "model.pt")
    assert Classifier.load(run_dir).hidden == Hidden("outside", 0.5)
    assert not Classifier.load(run_dir, hide="none").hidden
    with pytest.raises(CheckpointError, match="a shortcut test, not a classifier"):
        export.export(run_dir, str(run_dir / "export"))


def test_compare_sets_each_group_against_chance():
    truth = {f"f{i}": c for i, c in enumerate(["COVID-19"] * 5 + ["normal"] * 3 + ["viral"] * 2)}
    assert compare.chance(truth) == {"always": "COVID-19", "accuracy": 0.5,
                                     "balanced_accuracy": pytest.approx(1 / 3)}


@needs_sample
def test_evaluate_holds_out_the_runs_sources_unless_told(tmp_path, capsys):
    torch.manual_seed(0)
    os.makedirs(tmp_path / "run")
    torch.save({"model": build_model(3, "none", "resnet18").state_dict(), "size": 32,
                "classes": ["COVID-19", "normal", "pneumonia"],
                "config": {"arch": "resnet18", "resize": "squish", "data": SAMPLE,
                           "test_sources": "figure1"}}, tmp_path / "run" / "model.pt")
    m = evaluate.main([str(tmp_path / "run"), "--data", SAMPLE + os.sep, "--cache-dir", ""])
    assert m["n"] == 39 and m["test_sources"] == "figure1" and set(m["per_source"]) == {
        "figure1"}
    assert os.path.isdir(tmp_path / "run" / "eval_cxr-sample_test_sources-figure1")
    m = evaluate.main([str(tmp_path / "run"), "--data", SAMPLE, "--test-sources", "",
                       "--cache-dir", ""])
    assert m["n"] == 47 and "this test split holds films of the sources it trained on" in \
        capsys.readouterr().out


def test_the_report_and_the_card_say_what_a_shortcut_run_is():
    cfg = {"hide": "outside", "hide_box": 0.5, "resize": "crop", "test_sources": "nih"}
    said = "\n".join(shortcut_lines(cfg))
    assert "**Trained and tested on films with the lungs alone (all but the central 50% x 50% " \
        "of each film's centre square blacked out): a shortcut test, not a classifier.**" in said
    assert "Test split: the films of the sources nih, none of which trained" in said
    card = model_card(cfg, ["a", "b"], 32)
    assert card.index("a shortcut test, not a classifier") < card.index("## Intended use")
    assert "`hide` 'outside' (paper 'none')" in card and "the sources nih, held out" in card
