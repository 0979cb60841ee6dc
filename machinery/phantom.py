"""Synthetic "phantom" chest radiographs, so that everything runs with no download.

    labels, patients, pixels = make_split(100, seed=0, prefix="p-")   # 100 films

Each film has a body outline, two lungs, ribs, spine, heart and diaphragm, a random pose and
exposure, and noise. The four classes differ only inside the lungs, in the way the radiology
textbooks describe them, so a model must look at the lung fields to tell them apart:
    normal     clear lungs
    bacterial  one dense, lobar consolidation in one lung
    viral      bilateral, patchy perihilar opacities
    COVID-19   bilateral, peripheral, lower-zone ground glass
They are a test pattern, not a substitute for real data: a score on phantoms says the
pipeline works, nothing about radiographs.
"""
import numpy as np
from PIL import Image
from tqdm import tqdm

CLASSES = ["COVID-19", "bacterial", "normal", "viral"]  # sorted, as load_dataset sorts labels
SIZE = 256
# what a run on them is, for its report and model card
WHAT = ("synthetic phantoms (machinery/phantom.py): drawn films with a body, lungs, ribs and "
        "heart, whose four classes differ only by a pattern drawn inside the lungs; no patient, "
        "scanner or disease")
TELLS = "a score on phantoms says the pipeline learns, nothing about radiographs"


def _ellipse(X, Y, cx, cy, rx, ry, soft):
    """Soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    return np.clip((1 - r) / soft, 0, 1)


def _blobs(rng, n=24, size=SIZE):
    """Smooth random texture in [0, 1]: coarse noise, upsampled bicubically."""
    small = rng.random((n, n)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC))


def render(label, rng, size=SIZE):
    """One phantom film of class `label` (a name in CLASSES) -> (size, size) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    s = 1 + rng.normal(0, 0.04)  # patient size and position on the detector
    X = (xx - 0.5 - rng.normal(0, 0.02)) / s
    Y = (yy - 0.52 - rng.normal(0, 0.02)) / s
    body = _ellipse(X, Y, 0, 0.05, 0.46, 0.55, soft=0.1)
    dome = 0.26 + 0.5 * (np.abs(X) - 0.17) ** 2  # the diaphragm, one dome on each side
    below = np.clip((Y - dome) / 0.03, 0, 1)
    lungs = np.maximum(_ellipse(X, Y, -0.18, -0.04, 0.14, 0.32, soft=0.3),
                       _ellipse(X, Y, 0.18, -0.04, 0.14, 0.32, soft=0.3)) * (1 - below)
    img = 0.05 + 0.45 * body - 0.3 * lungs
    ribs = np.clip(np.sin(2 * np.pi * (Y + 0.6 * X ** 2) / 0.075), 0, 1) ** 2
    img += 0.07 * ribs * lungs
    img += 0.2 * np.clip((0.045 - np.abs(X)) / 0.02, 0, 1) * body  # spine
    img += 0.2 * _ellipse(X, Y, 0.06, 0.13, 0.15, 0.13, soft=0.6)  # heart, to the left
    img += 0.15 * below * body

    side = rng.choice([-1, 1])
    if label == "bacterial":  # one lobe filled: dense, fairly well defined
        cx, cy = side * rng.uniform(0.14, 0.22), rng.uniform(-0.05, 0.18)
        r = rng.uniform(0.06, 0.1)
        img += rng.uniform(0.25, 0.4) * _ellipse(X, Y, cx, cy, r, r * 1.3, soft=0.4) * lungs
    elif label == "viral":  # patchy, both sides, around the hila
        hila = np.exp(-(((np.abs(X) - 0.12) / 0.09) ** 2 + (Y / 0.16) ** 2))
        img += rng.uniform(0.2, 0.3) * hila * _blobs(rng, size=size) * lungs
    elif label == "COVID-19":  # hazy, both sides, at the periphery of the lower zones
        edge = np.exp(-((np.abs(X) - 0.28) / 0.07) ** 2) / (1 + np.exp(-(Y - 0.02) / 0.05))
        img += rng.uniform(0.25, 0.35) * edge * (0.6 + 0.4 * _blobs(rng, 12, size)) * lungs

    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)  # exposure
    img += rng.normal(0, 0.03, img.shape)  # quantum noise
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_split(n, seed, prefix):
    """n films of random classes; one or two films per patient, as in real data sets."""
    rng = np.random.default_rng(seed)
    labels, patients, pixels = [], [], []
    with tqdm(total=n, desc=f"rendering {n} phantoms", unit="img", leave=False,
              disable=None) as bar:  # a bar on a terminal alone: a log file gets no frames
        while len(labels) < n:
            c = int(rng.integers(len(CLASSES)))
            pid = f"{prefix}{len(set(patients)):05d}"
            for _ in range(min(int(rng.integers(1, 3)), n - len(labels))):
                labels.append(c)
                patients.append(pid)
                pixels.append(render(CLASSES[c], rng))
                bar.update()
    return labels, patients, np.stack(pixels)
