"""Data: both layouts, every image mode, clear errors, the cache, batches and augmentation."""
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

from machinery import datasets, films, phantom

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cxr-sample")


def write_image(path, mode, size=(40, 30)):
    """A small test image in the given PIL mode, with a left-to-right gradient."""
    g = np.tile(np.linspace(0, 1, size[0]), (size[1], 1))
    if mode == "I;16":
        img = Image.fromarray((g * 4095).astype(np.uint16))  # 12 bits used, as many DICOMs
    elif mode == "RGBA":
        a = np.dstack([(g * 255).astype(np.uint8)] * 3 + [np.full(g.shape, 255, np.uint8)])
        a[:, :5, 3] = 0  # a transparent strip on the left
        img = Image.fromarray(a, "RGBA")
    else:
        img = Image.fromarray((g * 255).astype(np.uint8)).convert(mode)
    img.save(path)


def make_covidx(root, n=6, columns=4):
    """A COVIDx-style folder: train/, test/, train.txt, test.txt; two classes."""
    for split in ("train", "test"):
        os.makedirs(root / split)
        with open(root / f"{split}.txt", "w") as f:
            for i in range(n):
                name = f"{split}{i}.png"
                write_image(root / split / name, "L")
                label = ["normal", "COVID-19"][i % 2]
                f.write(f"{split}-p{i // 2} {name} {label}" + (" src" if columns == 4 else "")
                        + "\n")


@pytest.mark.parametrize("columns", [3, 4])
def test_covidx_layout(tmp_path, columns):
    make_covidx(tmp_path, columns=columns)
    classes, splits = datasets.load_dataset(str(tmp_path))
    assert classes == ["COVID-19", "normal"]  # from the data, sorted
    assert len(splits["train"]) == 6 and len(splits["test"]) == 6
    assert splits["train"].labels[:2] == [1, 0]
    assert splits["train"].paths[0] == os.path.join(str(tmp_path), "train", "train0.png")
    assert splits["train"].sources[0] == ("src" if columns == 4 else "")
    px = films.load_pixels(splits["train"], [16, 24])
    assert px.images[16].shape == (6, 1, 16, 16) and px.images[24].dtype == np.uint8


def test_crop_mode_stores_the_films_larger_with_their_shapes(tmp_path):
    make_covidx(tmp_path)  # 40x30 films: 4:3
    write_image(tmp_path / "train" / "train1.png", "L", size=(30, 45))  # a 2:3 portrait
    _, splits = datasets.load_dataset(str(tmp_path))
    squish = films.load_pixels(splits["train"], [16])
    assert squish.images[16].shape == (6, 1, 16, 16)
    assert squish.hw.tolist() == pytest.approx([0.75, 1.5, 0.75, 0.75, 0.75, 0.75])
    crop = films.load_pixels(splits["train"], [16, 24], str(tmp_path / "cache"), "crop")
    # the longest aspect ratio, 1.5, sets the square: a crop window keeps 16 px of detail
    assert crop.images[16].shape == (6, 1, 24, 24) and crop.images[24].shape == (6, 1, 36, 36)
    assert torch.equal(crop.hw, squish.hw)
    assert films.stored_size(100, "crop", 3.0) == 150  # longer films: at most 1.5x
    again = films.load_pixels(splits["train"], [16, 24], str(tmp_path / "cache"), "crop")
    assert np.array_equal(again.images[24], crop.images[24])  # from the cache, keyed by mode
    assert len(glob.glob(str(tmp_path / "cache" / "*.npy"))) == 3  # each with its .crc32


def test_split_files_of_other_covidx_versions(tmp_path):
    make_covidx(tmp_path)
    os.rename(tmp_path / "train.txt", tmp_path / "train_COVIDx9A.txt")
    os.rename(tmp_path / "test.txt", tmp_path / "test_COVIDx9A.txt")
    assert datasets.find_split_files(str(tmp_path))[0].endswith("train_COVIDx9A.txt")
    os.rename(tmp_path / "train_COVIDx9A.txt", tmp_path / "train_split.txt")
    os.rename(tmp_path / "test_COVIDx9A.txt", tmp_path / "test_split.txt")
    assert datasets.find_split_files(str(tmp_path))[1].endswith("test_split.txt")
    # named by the user, with all images in one folder
    os.makedirs(tmp_path / "all")
    for s in ("train", "test"):
        for f in os.listdir(tmp_path / s):
            os.rename(tmp_path / s / f, tmp_path / "all" / f)
    classes, splits = datasets.load_dataset(str(tmp_path), "train_split.txt", "test_split.txt",
                                        image_dir=str(tmp_path / "all"))
    assert len(splits["test"]) == 6 and os.path.isfile(splits["test"].paths[0])


def test_image_folder_layouts(tmp_path):
    for split in ("train", "test"):
        for cls in ("normal", "pneumonia"):
            os.makedirs(tmp_path / split / cls)
            for i in range(3):
                write_image(tmp_path / split / cls / f"{cls}{i}.png", "L")
    (tmp_path / "train" / "normal" / "notes.txt").write_text("not an image")
    classes, splits = datasets.load_dataset(str(tmp_path))
    assert classes == ["normal", "pneumonia"]
    assert len(splits["train"]) == 6 and splits["train"].labels == [0, 0, 0, 1, 1, 1]
    # flat root/<class>/: a fifth of the patients become the test split
    flat = tmp_path / "train"
    classes, splits = datasets.load_dataset(str(flat))
    assert len(splits["train"]) + len(splits["test"]) == 6 and len(splits["test"]) >= 1
    assert not set(splits["train"].paths) & set(splits["test"].paths)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_every_image_mode_decodes_to_gray(tmp_path, mode):
    ext = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{ext}"
    write_image(path, mode)
    dims, out = films.decode(str(path), [20, 10])
    assert dims == (40, 30) and [a.shape for a in out] == [(20, 20), (10, 10)]
    assert all(a.dtype == np.uint8 for a in out)
    a = out[0].astype(int)
    assert a[:, -1].mean() > 200 and a[:, 5].mean() < 80  # the gradient survives
    if mode == "I;16":  # 12-bit data stretched to the full 8-bit range
        assert a.max() >= 250 and a.min() <= 5
    if mode == "RGBA":  # transparent pixels are black
        assert a[:, 0].max() == 0


def test_jpeg_16bit_and_rgba_through_load_pixels(tmp_path):
    make_covidx(tmp_path)
    write_image(tmp_path / "train" / "train0.png", "I;16")
    write_image(tmp_path / "train" / "train1.png", "RGBA")
    classes, splits = datasets.load_dataset(str(tmp_path))
    px = films.load_pixels(splits["train"], [8]).images[8]
    assert px.shape == (6, 1, 8, 8) and px[0].max() > 200


def test_missing_and_corrupt_files_are_named(tmp_path):
    make_covidx(tmp_path)
    os.remove(tmp_path / "train" / "train3.png")
    with pytest.raises(datasets.DataError, match=r"1 listed images are missing.*:\n.*train3.png"):
        datasets.load_dataset(str(tmp_path))
    write_image(tmp_path / "train" / "train3.png", "L")
    classes, splits = datasets.load_dataset(str(tmp_path))
    (tmp_path / "train" / "train4.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(datasets.DataError, match=r"1 images could not be read.*:\n.*train4.png"):
        films.load_pixels(splits["train"], [8])
    with pytest.raises(datasets.DataError, match="could not be read"):  # the cache half built
        films.load_pixels(splits["train"], [8], cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # as the films came: removed, nothing cached


def test_malformed_line_is_reported_with_its_number(tmp_path):
    make_covidx(tmp_path)
    with open(tmp_path / "train.txt", "a") as f:
        f.write("only-two fields\n")
    with pytest.raises(datasets.DataError, match="line 7: 'only-two fields'"):
        datasets.load_dataset(str(tmp_path))


def test_patient_in_train_and_test_is_an_error_unless_allowed(tmp_path):
    make_covidx(tmp_path)
    with open(tmp_path / "test.txt", "a") as f:
        f.write("train-p0 extra.png normal src\n")
    write_image(tmp_path / "test" / "extra.png", "L")
    with pytest.raises(datasets.DataError, match="train-p0.*--allow-patient-overlap"):
        datasets.load_dataset(str(tmp_path))
    datasets.load_dataset(str(tmp_path), allow_patient_overlap=True)


def test_a_test_label_that_train_lacks_is_an_unknown_label(tmp_path):
    make_covidx(tmp_path)
    with open(tmp_path / "test.txt", "a") as f:
        f.write("new-p new.png pneumonia src\n")
    write_image(tmp_path / "test" / "new.png", "L")
    with pytest.raises(datasets.DataError, match=r"1 test labels that train does not have .a typo"
                       r".*:\n    pneumonia \(1 images\)") as e:
        datasets.load_dataset(str(tmp_path))
    assert "classes with no images" not in str(e.value)
    classes, _ = datasets.load_dataset(str(tmp_path), allow_missing_class=True)
    assert classes == ["COVID-19", "normal", "pneumonia"]


def test_an_empty_data_set_is_named(tmp_path):
    make_covidx(tmp_path)
    open(tmp_path / "train.txt", "w").close()
    with pytest.raises(datasets.DataError, match=r"not usable:\n  the train split is empty$"):
        datasets.load_dataset(str(tmp_path))


def test_an_empty_class_folder_is_a_class_with_no_images(tmp_path):
    for split in ("train", "test"):
        for cls in ("COVID-19", "normal"):
            os.makedirs(tmp_path / split / cls)
            if (split, cls) != ("test", "COVID-19"):
                write_image(tmp_path / split / cls / "a.png", "L")
    with pytest.raises(datasets.DataError, match="COVID-19: none in test .its sensitivity"):
        datasets.load_dataset(str(tmp_path))
    classes, splits = datasets.load_dataset(str(tmp_path), allow_missing_class=True)
    assert classes == ["COVID-19", "normal"] and splits["test"].labels == [1]


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/data/cxr-sample absent")
def test_subtypes_that_leave_a_class_empty_are_reported(tmp_path):
    with open(tmp_path / "subtype.csv", "w") as f:  # every pneumonia is bacterial
        f.write("filename,subtype\n" + "".join(
            f"{line.split()[1]},bacterial\n" for split in ("train", "test")
            for line in open(os.path.join(SAMPLE, f"{split}.txt")) if "pneumonia" in line))
    with pytest.raises(datasets.DataError, match=r"viral: none in train or test"):
        datasets.load_dataset(SAMPLE, subtypes=str(tmp_path / "subtype.csv"))


def test_cache_is_reused_and_never_written_beside_the_data(tmp_path, monkeypatch):
    make_covidx(tmp_path / "d")
    before = sorted(os.listdir(tmp_path / "d"))
    classes, splits = datasets.load_dataset(str(tmp_path / "d"))
    first = films.load_pixels(splits["train"], [8, 12], cache_dir=str(tmp_path / "cache"))
    assert len(glob.glob(str(tmp_path / "cache" / "*.npy"))) == 3  # a file per size, one of sizes
    assert len(os.listdir(tmp_path / "cache")) == 6  # and the CRC-32 of each
    assert sorted(os.listdir(tmp_path / "d")) == before

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr(films, "decode", no_decoding)
    second = films.load_pixels(splits["train"], [8, 12], cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(first.images[12], second.images[12])
    assert torch.equal(first.hw, second.hw)
    # a rewritten image invalidates the cache
    write_image(tmp_path / "d" / "train" / "train2.png", "RGB", size=(50, 50))
    os.utime(tmp_path / "d" / "train" / "train2.png", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded although cached"):
        films.load_pixels(splits["train"], [8], cache_dir=str(tmp_path / "cache"))


def test_split_patients_keeps_patients_whole_and_classes_balanced():
    patients = [f"p{i // 4}" for i in range(200)]  # 50 patients with 4 films each
    items = datasets.Items(labels=[int(p[1:]) % 2 for p in patients], patients=patients)
    tr, va = datasets.split_patients(items, 0.1, seed=0)
    assert sorted(tr + va) == list(range(200))
    assert not {items.patients[i] for i in tr} & {items.patients[i] for i in va}
    for c in (0, 1):
        n_val = sum(items.labels[i] == c for i in va)
        assert 8 <= n_val <= 16  # ~10% of each class's 100 images, in whole patients


def test_phantoms_are_deterministic_and_have_four_classes():
    c1, s1 = datasets.load_dataset("phantom", n_phantoms=40, seed=1)
    _, s1b = datasets.load_dataset("phantom", n_phantoms=40, seed=1)
    _, s2 = datasets.load_dataset("phantom", n_phantoms=40, seed=2)
    assert c1 == phantom.CLASSES and len(c1) == 4
    assert np.array_equal(s1["train"].pixels, s1b["train"].pixels)
    assert not np.array_equal(s1["train"].pixels, s2["train"].pixels)
    assert not set(s1["train"].patients) & set(s1["test"].patients)
    px = films.load_pixels(s1["test"], [16, 24])
    assert px.images[24].shape == (40, 1, 24, 24) and px.images[24].dtype == np.uint8
    assert torch.equal(px.hw, torch.ones(40))  # phantoms are square
    for c in phantom.CLASSES:  # any size, every class (bench.py writes them at 512 and 1024)
        assert phantom.render(c, np.random.default_rng(0), 100).shape == (100, 100)


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/data/cxr-sample absent")
def test_real_sample_three_and_four_classes():
    classes, splits = datasets.load_dataset(SAMPLE)
    assert classes == ["COVID-19", "normal", "pneumonia"]
    assert len(splits["train"]) == 192 and len(splits["test"]) == 47
    classes, splits = datasets.load_dataset(SAMPLE, subtypes=os.path.join(SAMPLE, "subtype.csv"))
    assert classes == ["COVID-19", "bacterial", "normal", "viral"]
    assert len(splits["train"]) < 192  # pneumonia films of unknown kind are left out


def test_all_problems_of_a_data_set_in_one_message(tmp_path):
    make_covidx(tmp_path, n=30)
    with open(tmp_path / "train.txt", "a") as f:
        f.write("only-two fields\n")
        f.write("train-p9 train1.png normal src\n")  # the same file a second time
    with open(tmp_path / "test.txt", "a") as f:
        f.write("a b c d e\n")
        f.write("train-p3 extra.png pneumonia src\n")  # a new label; a train patient
    for i in range(12):
        os.remove(tmp_path / "train" / f"train{i + 2}.png")
    (tmp_path / "train" / "train20.png").write_bytes(b"garbage")
    (tmp_path / "test" / "test5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    problems = datasets.Problems()
    classes, splits = datasets.load_dataset(str(tmp_path), problems=problems)
    assert len(problems) == 5 and len(splits["train"]) == 30 + 1 - 12  # missing left out
    assert films.load_pixels(splits["train"], [8], problems=problems) is None
    assert films.load_pixels(splits["test"], [8], problems=problems) is None
    with pytest.raises(datasets.DataError) as e:
        problems.check()
    msg = str(e.value)
    assert msg.startswith("the data set is not usable:\n  2 malformed lines")
    assert "train.txt line 31: 'only-two fields'" in msg and "test.txt line 31" in msg
    assert "1 test labels that train does not have" in msg and "pneumonia (1 images)" in msg
    assert "1 files listed more than once" in msg and "train1.png" in msg
    assert "1 patients are in both train and test (e.g. train-p3)" in msg
    assert "13 listed images are missing" in msg and "train2.png" in msg  # in listed order
    assert msg.count("train1") >= 1 and "\n    ..." in msg  # the first ten, then ...
    assert "1 images could not be read" in msg and "train20.png" in msg
    assert "test5.png (" in msg


def test_images_smaller_than_the_stage_size_are_upscaled_with_a_warning(tmp_path, capsys):
    make_covidx(tmp_path)  # 40 x 30 images
    write_image(tmp_path / "train" / "train0.png", "L", size=(300, 260))
    classes, splits = datasets.load_dataset(str(tmp_path))
    for _ in range(2):  # decoded, then from the cache: the warning comes both times
        px = films.load_pixels(splits["train"], [64, 256], cache_dir=str(tmp_path / "cache"))
        assert px.images[256].shape == (6, 1, 256, 256)
        out = capsys.readouterr().out
        assert "warning: 5 of 6 images are smaller than 256 px" in out and "(40x30)" in out
    films.load_pixels(splits["train"], [24])
    assert "smaller" not in capsys.readouterr().out


def test_non_image_files_in_an_image_folder_are_skipped_with_a_warning(tmp_path, capsys):
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "normal")
        write_image(tmp_path / split / "normal" / "a.png", "L")
        (tmp_path / split / "normal" / "Thumbs.db").write_bytes(b"x")
    classes, splits = datasets.load_dataset(str(tmp_path))
    assert len(splits["train"]) == 1
    assert "skipped 1 files that are not images" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason="../shared/data/cxr-sample absent")
def test_a_damaged_film_cache_is_decoded_again(tmp_path, capsys):
    from machinery import films
    _, splits = datasets.load_dataset(SAMPLE)
    first = films.load_pixels(splits["test"], [32], str(tmp_path)).images[32].copy()
    cache = [f for f in os.listdir(tmp_path) if f.endswith("-32.npy")][0]
    path = tmp_path / cache
    with open(path, "r+b") as f:  # bytes changed in place: the shape still fits
        f.seek(-40, 2)
        f.write(bytes(40))
    again = films.load_pixels(splits["test"], [32], str(tmp_path)).images[32]
    assert "is damaged (its checksum)" in capsys.readouterr().out
    assert (again == first).all()
    os.truncate(path, os.path.getsize(path) // 2)  # truncated
    again = films.load_pixels(splits["test"], [32], str(tmp_path)).images[32]
    assert "is damaged (ValueError" in capsys.readouterr().out and (again == first).all()
