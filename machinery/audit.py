"""The data audit: duplicates across splits, patients under two ids, one source per class, and
how far the labels can be told from the file's metadata alone, found before any training.

    th = thumbs(films.images[64])                 # (N, 64, 64) float: every film, small
    pairs = near_duplicates(th_test, th_train)    # [Pair(i, j, hamming, ncc, identical)]
    table, warnings = source_table(classes, items)
    shortcut = shortcut_baseline(metadata(paths, th), labels, patients, sources, classes)

Why: the COVID literature's most common faults (Roberts et al., Nature Machine Intelligence
2021) are the same film in train and test, and classes that come from different hospitals, so
that a model can score by recognising the source (or, in COVIDx v1, the patient's age).

Near-duplicates in two steps. A perceptual hash (the signs of the 8 x 8 lowest frequencies of
the film's 2-D DCT, Zauner 2010) finds candidates cheaply: a film and its resized, re-encoded,
brightened or 16-bit copy differ in at most a few of its 63 bits. But radiographs look alike: two
distinct children's films can differ in only 6 bits, so each candidate is confirmed by its
detail: the correlation of the two films' high-passed 64 px pictures, the best over small shifts
and scales (crops of a few percent move and stretch a film). Measured on copies of cxr-sample's
192 training films (audit.py --measure; docs/data.md#the-audit): every copy resized, re-encoded,
brightened, 16-bit or cropped by up to 2% a side found, 95% of those cropped by up to 4%; no
pair among the 18,225 pairs of films of different patients.
"""
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from machinery.datasets import Items

THUMB = 64  # px: the films compared (a 64 px film still shows ribs, tubes and markers)
HASH_MAX = 10  # Hamming distance (of 63 bits) under which a pair is a candidate
NCC_MIN = 0.8  # detail correlation that confirms a candidate
SCALES = (0.93, 1.0, 1.07)  # each axis: crops of up to ~5% per side
FINE = (0.94, 0.97, 1.0, 1.03, 1.06)  # searched again where SCALES scored >= REFINE_MIN
REFINE_MIN = 0.6  # copies cropped by 2-4% a side score >= 0.70 on SCALES (measured on
# cxr-sample), and only 3% of the distinct candidate pairs of COVIDx v1 reach 0.6
INSET = 0.1  # the template: the film less 10% at each side, searched over all shifts


def thumbs(images, chunk=512):
    """uint8 films (N, 1, T, T) (a numpy memmap is read a chunk at a time) -> float32
    (N, THUMB, THUMB), area-averaged."""
    out = torch.empty(len(images), THUMB, THUMB)
    for k in range(0, len(images), chunk):
        x = torch.from_numpy(np.array(images[k:k + chunk])).float()
        mode = "area" if x.shape[-1] >= THUMB else "bilinear"
        out[k:k + chunk] = F.interpolate(x, size=(THUMB, THUMB), mode=mode)[:, 0]
    return out


def _dct(n):
    k, i = torch.arange(n)[:, None].float(), torch.arange(n)[None].float()
    return torch.cos(math.pi * (2 * i + 1) * k / (2 * n))  # DCT-II, unnormalised


def phash(th):
    """(N, S, S) films -> (N, 63) bool: the 8 x 8 lowest DCT frequencies of the 32 px film,
    less the mean (DC), above their median."""
    d = _dct(32)
    c = d @ F.interpolate(th[:, None], size=(32, 32), mode="area")[:, 0] @ d.T
    c = c[:, :8, :8].reshape(len(th), 64)[:, 1:]
    return c > c.median(1, keepdim=True).values


def sha256(path):
    """A file's SHA-256: the same bytes (audit.py), the films of a manifest
    (tools/make_covidx_v1.py)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


POPCOUNT = torch.tensor([bin(n).count("1") for n in range(256)], dtype=torch.uint8)


def pack(bits):
    """(N, 63) bool -> (N, 8) uint8: eight bits a byte, so that XOR and a table count them."""
    b = F.pad(bits, (0, 1)).view(len(bits), 8, 8).to(torch.uint8)
    return (b << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def detail(th):
    """High-pass: the film less its 7 x 7 local mean. Distinct films share their shape (lungs,
    heart, clavicles); a copy shares its detail."""
    x = F.pad(th[:, None], (3, 3, 3, 3), mode="replicate")
    return th - F.avg_pool2d(x, 7, 1)[:, 0]


def aligned_ncc(a, b, scales=SCALES):
    """(P, S, S) detail pictures of P pairs -> (P,): the best normalised correlation of a's
    inner part with any same-size window of b, over `scales` on each axis. All pairs at once:
    a grouped convolution, one group per pair."""
    P, S = a.shape[0], a.shape[-1]
    m = int(S * INSET)
    inner = a[:, None, m:S - m, m:S - m]
    best = torch.full((P,), -1.0)
    B = b[None]  # (1, P, S, S): pair p's film b is channel p
    for sy in scales:
        for sx in scales:
            kh, kw = round((S - 2 * m) * sy), round((S - 2 * m) * sx)
            t = F.interpolate(inner, size=(kh, kw), mode="bilinear", align_corners=False)
            t = t - t.mean((2, 3), keepdim=True)
            t = t / t.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None, None]
            num = F.conv2d(B, t, groups=P)  # (1, P, S-kh+1, S-kw+1)
            ones = torch.ones(P, 1, kh, kw)
            s1, s2 = F.conv2d(B, ones, groups=P), F.conv2d(B * B, ones, groups=P)
            var = (s2 - s1 * s1 / (kh * kw)).clamp_min(1e-6)  # each window's spread
            best = torch.maximum(best, (num / var.sqrt()).flatten(2).amax(2)[0])
    return best


@dataclass
class Pair:
    i: int  # index in the first set
    j: int  # index in the second set
    hamming: int
    ncc: float
    identical: bool  # the same pixels, as decoded at the thumbnail size


def near_duplicates(th_a, th_b=None, chunk=256, batch=2048):
    """Pairs (i in a, j in b) that are the same picture, resized, re-encoded or cropped a
    little; th_b None: pairs within a (i < j). Thumbnails from thumbs()."""
    if not len(th_a) or (th_b is not None and not len(th_b)):
        return []
    ha = pack(phash(th_a))
    hb = ha if th_b is None else pack(phash(th_b))
    th_b = th_a if th_b is None else th_b
    found = []  # the candidates: (i, j, Hamming distance) of each chunk
    for k in range(0, len(ha), chunk):  # Hamming distances a chunk of rows at a time
        d = POPCOUNT[(ha[k:k + chunk, None, :] ^ hb[None, :, :]).int()].sum(-1, dtype=torch.int16)
        if th_b is th_a:
            d.masked_fill_(torch.arange(k, k + len(d))[:, None] >= torch.arange(len(hb)), 99)
        i, j = (d <= HASH_MAX).nonzero(as_tuple=True)
        found.append((i + k, j, d[i, j]))
    ii, jj, dd = map(torch.cat, zip(*found))
    if not len(ii):
        return []
    da, db = detail(th_a), detail(th_b)
    out = []
    for k in range(0, len(ii), batch):
        i, j = ii[k:k + batch], jj[k:k + batch]
        ncc = aligned_ncc(da[i], db[j])
        near = (ncc >= REFINE_MIN) & (ncc < NCC_MIN)  # a crop between two scales, perhaps
        if near.any():
            ncc[near] = torch.maximum(ncc[near], aligned_ncc(da[i[near]], db[j[near]], FINE))
        same = (th_a[i] == th_b[j]).flatten(1).all(1)
        for n in (ncc >= NCC_MIN).logical_or(same).nonzero()[:, 0].tolist():
            out.append(Pair(int(i[n]), int(j[n]), int(dd[k + n]), round(float(ncc[n]), 3),
                            bool(same[n])))
    return out


def leaks(th_train, th_test, train, test, allow, problems, classes):
    """The check at every training start: test films with an exact or near duplicate in the
    training split (validation included) -> a summary for the run folder, with the sources by
    class; the films are a problem unless `allow` (--allow-duplicates). One line per test film,
    naming its copies."""
    pairs = near_duplicates(th_test, th_train)
    copies = {}
    for p in pairs:
        how = "identical" if p.identical else f"hamming {p.hamming}, detail {p.ncc:.2f}"
        copies.setdefault(p.i, []).append(f"{train.paths[p.j] or train.patients[p.j]} ({how})")
    named = [f"{test.paths[i] or test.patients[i]} ~ {', '.join(c)}" for i, c in copies.items()]
    if named and not allow:
        problems.add("test films have an exact or near duplicate in training", named,
                     " (test accuracy would be inflated: remove one of each pair, or pass "
                     "--allow-duplicates to go on anyway)")
    table, warnings = source_table(classes, Items(labels=train.labels + test.labels,
                                                  sources=train.sources + test.sources))
    return {"test_films_with_duplicate_in_train": len(named), "films": named,
            "pairs": len(pairs), "identical": sum(p.identical for p in pairs),
            "hamming_max": HASH_MAX, "ncc_min": NCC_MIN, "allowed": bool(allow),
            "sources": table, "source_warnings": warnings}


def val_leaks(th, tr, va, items):
    """Validation films (rows va of items) with an exact or near duplicate among the training
    films (rows tr) -> a summary; said as a warning, not a stop: they inflate the validation
    numbers of each epoch, which the recipe never selects on (it keeps the last weights)."""
    pairs = near_duplicates(th[va], th[tr])  # [] when either is empty
    named = sorted({items.paths[va[p.i]] for p in pairs})
    if named:
        print(f"warning: {len(named)} validation films have an exact or near duplicate in "
              f"training (e.g. {named[0]}): the validation numbers are inflated by them")
    return {"val_films_with_duplicate_in_train": len(named), "val_films": named}


# ---------------------------------------------------------------------------------------------
# Sources and shortcuts: what audit.py adds to the duplicates

def sources_md(sources, classes):
    """source_table's counts as markdown table lines (audit.md, report.md, the model card)."""
    return (["| source | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"] +
            [f"| {s} | " + " | ".join(str(row.get(c, 0)) for c in classes) + " |"
             for s, row in sorted(sources.items())])


def source_table(classes, items, most=0.75, rest=0.25):
    """({source: {class: count}}, warnings): a warning for each class that comes mostly (>=
    `most`) from one source which gives little (< `rest`) of the other classes' films: a model
    can then learn the source (its scanner, its markers, its patients' age) for the class."""
    table = {}
    for lab, src in zip(items.labels, items.sources):
        row = table.setdefault(src or "(none)", dict.fromkeys(classes, 0))
        row[classes[lab]] += 1
    warnings = []
    for c in classes:
        n = sum(row[c] for row in table.values())
        if not n:
            continue
        src, k = max(((s, row[c]) for s, row in table.items()), key=lambda t: t[1])
        others = sum(v for cc, v in table[src].items() if cc != c)
        total_others = sum(v for row in table.values() for cc, v in row.items() if cc != c)
        if total_others and k / n >= most and others < rest * total_others:
            warnings.append(f"{c}: {k} of its {n} films come from {src}, which gives only "
                            f"{others} of the other classes' {total_others}")
    return table, warnings


COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
FEATURES = ["width", "height", "aspect", "megapixels", "bit depth", "colour", "mean", "spread",
            "jpeg", "png", "other format"]


def metadata(paths, th):
    """(N, len(FEATURES)) float: what a file says without its lungs: size, bit depth, colour
    mode, format (from the header), and the mean and spread of its intensities (th: the
    decoded films, 0..255)."""
    rows = []
    for p in paths:
        with Image.open(p) as img:
            (w, h), mode, fmt = img.size, img.mode, (img.format or "").upper()
        bits = 16 if mode in ("I;16", "I;16B", "I;16L", "I") else 32 if mode == "F" else 8
        rows.append([w, h, h / w, w * h / 1e6, bits, float(mode in COLOUR_MODES), 0, 0,
                     float(fmt == "JPEG"), float(fmt == "PNG"), float(fmt not in ("JPEG", "PNG"))])
    x = torch.tensor(rows, dtype=torch.float32).reshape(-1, len(FEATURES))
    x[:, 6], x[:, 7] = th.flatten(1).mean(1), th.flatten(1).std(1)
    return x


def logistic_cv(x, y, groups, k=5, seed=0):
    """(accuracy, {class: recall}) of a multinomial logistic regression on x, cross-validated
    in k folds of whole groups (patients): each film is predicted by a model that never saw
    its patient. The recalls (and their mean, the balanced accuracy) show a shortcut to a rare
    class, COVID-19 in v1, that accuracy hides."""
    y = torch.as_tensor(y)
    uniq = sorted(set(groups))
    perm = torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed)).tolist()
    fold = {g: perm[n] % k for n, g in enumerate(uniq)}
    if len(uniq) < 2:
        raise ValueError("the shortcut baseline needs films of 2 patients or more")
    folds = torch.tensor([fold[g] for g in groups])
    pred = torch.full_like(y, -1)
    n_cls = int(y.max()) + 1
    for f in range(min(k, len(uniq))):  # each fold holds a patient at least
        tr, te = folds != f, folds == f
        mu, sd = x[tr].mean(0), x[tr].std(0, correction=0).clamp_min(1e-6)
        z = (x - mu) / sd
        w = torch.zeros(x.shape[1], n_cls, requires_grad=True)
        b = torch.zeros(n_cls, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            out = F.cross_entropy(z[tr] @ w + b, y[tr]) + 1e-3 * w.square().sum()
            out.backward()
            return out
        opt.step(loss)
        pred[te] = (z[te] @ w + b).argmax(1)
    recall = {c: (pred[y == c] == c).float().mean().item() for c in range(n_cls) if (y == c).any()}
    return (pred == y).float().mean().item(), recall


def shortcut_baseline(x, labels, patients, sources, classes):
    """How far the labels follow from metadata alone: the cross-validated accuracy and
    balanced accuracy with and without the source as a feature, against chance (accuracy:
    always the largest class; balanced accuracy: 1 / the number of classes present)."""
    names = sorted(set(sources))
    onehot = torch.tensor([[float(s == n) for n in names] for s in sources]).reshape(len(x), -1)
    counts = np.bincount(labels, minlength=len(classes))
    out = {"chance": round(float(counts.max() / len(labels)), 4),
           "balanced_chance": round(1 / int((counts > 0).sum()), 4)}
    for key, feats in (("image_properties", x), ("with_source", torch.cat([x, onehot], 1))):
        acc, recall = logistic_cv(feats, labels, patients)
        out[key] = round(acc, 4)
        out["balanced_" + key] = round(sum(recall.values()) / len(recall), 4)
        out["recall_" + key] = {classes[c]: round(r, 4) for c, r in recall.items()}
    return {**out, "features": FEATURES + [f"source={n}" for n in names]}
