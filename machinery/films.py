"""Films: every image file decoded once, to one-channel uint8 at every stage size, and cached.

    films = load_pixels(items, (128, 224, 229), cache_dir, "crop")   # items: a datasets.Items
    films.images[224]                   # uint8 (N, 1, T, T): each film whole, squished
    films.hw                            # (N,) each film's height / width, for the crop
    films.to(224, "cuda")               # one stage's films on the device (a split's rows)

The airbench way: decoded in parallel on all cores into uint8 arrays cached on disk, memory-mapped,
and moved to the training device a stage size at a time (or, with --data-on cpu, gathered batch by
batch from host memory: hostmem.py); data.py makes the batches there (resizing by cropping
included). No DataLoader, no worker processes: the GPU never waits on a JPEG decoder.
"""
import hashlib
import math
import multiprocessing
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from machinery.datasets import Problems
from machinery.shortcuts import WHOLE

CROP_MARGIN = 1.5  # --resize crop: films up to 1.5:1 keep full detail (see stored_size)
# bump when decoding changes, so old caches are not reused (7: full resolution, torch's resize)
CACHE_VERSION = 7


def to_gray(img):
    """Any PIL image -> 8-bit grayscale ('L'). Radiographs carry one channel of information.

    Floats ('F': a float TIFF, an array of floats) are intensities in [0, 1], as torchvision's
    to_tensor makes them: x 255, rounded. Integers wider than 8 bits (16-bit films often use
    12) have their used range stretched onto 0..255. A ValueError for NaN or infinite pixels,
    or floats outside [0, 1] (decode() and the API say it as the film's error)."""
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:  # NaN would blank the film: a confident answer for a black one
            raise ValueError(f"{bad} of its {a.size} pixels are NaN or infinite: not a film")
        lo, hi = float(a.min()), float(a.max())
        if lo < -0.5 / 255 or hi > 1 + 0.5 / 255:  # within half a level: rounding's overshoot
            raise ValueError(f"float pixels from {lo:g} to {hi:g}: a float film holds "
                             "intensities in [0, 1] (divide 8-bit values by 255, 16-bit ones by "
                             "65535, or give the integers)")
        return Image.fromarray(np.round(a * 255).clip(0, 255).astype(np.uint8))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return Image.fromarray(stretch(np.asarray(img)))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # transparent pixels become black, not their hidden colour
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    return img.convert("L")


def stretch(a):
    """Integers of any width -> uint8, their used range onto 0..255 (a constant film: 0)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return a.round().astype(np.uint8)


def decode(path, sizes, hidden=WHOLE):
    """One file -> ((width, height), [uint8 array (size, size) for each size]): the whole film
    squished to each square, or the error as a string. hidden: --hide's shortcuts.Hidden."""
    try:
        with Image.open(path) as img:  # at full resolution, as the API and the export see it
            return squares(img, sizes, hidden)
    except Exception as e:  # corrupt, truncated, not an image
        return f"{type(e).__name__}: {e}"


def upright_gray(img, hidden=WHOLE):
    """A PIL image as every view of it starts: turned upright (EXIF), one 8-bit channel (an
    array), --hide's box blacked out."""
    return hidden.apply(np.asarray(to_gray(ImageOps.exif_transpose(img))))


def squares(img, sizes, hidden=WHOLE):
    """A PIL image -> ((width, height), [uint8 array (size, size) for each size]).

    hidden (--hide): its box is blacked out on the film as decoded, before any resize, crop or
    augmentation, so that every size and view of it has the same box hidden."""
    a = upright_gray(img, hidden)
    x = torch.from_numpy(a.astype(np.float32))[None, None]  # once for every size
    return (a.shape[1], a.shape[0]), [square(x, s)[0, 0].numpy() for s in sizes]


def square(x, t):
    """Films (N, 1, H, W) of 8-bit values (uint8, or as floats) -> uint8 (N, 1, t, t): each
    film whole, squished to the square by an antialiased bilinear resize, rounded to 8 bits.

    How every film is stored (training's cache, phantoms, the API) and what the exported model
    does first: one definition, so that a film gets one answer wherever it is classified."""
    x = F.interpolate(x.float(), size=(t, t), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def film_aspect(paths):
    """The largest long/short side ratio among the files, read from their headers alone."""
    a = 1.0
    for p in paths:
        with suppress(Exception), Image.open(p) as img:  # unreadable: decode() reports it
            a = max(a, max(img.size) / min(img.size))
    return a


def stored_size(size, mode, aspect):
    """Side of the square a film is stored at for a stage of `size` px.

    'squish' trains on the whole film squished to the square: stored at the size itself.
    'crop' (fastai v1's ResizeMethod.CROP) trains on a square window of the film resized so
    that its shorter side is `size`: along the long side that window is size/aspect of the
    film. Stored squished to size * aspect (at most CROP_MARGIN), the window keeps its full
    detail; data.py takes it out with the augmentation's one grid_sample."""
    return size if mode == "squish" else math.ceil(size * min(aspect, CROP_MARGIN))


def fingerprint(paths, mode, hidden=WHOLE):
    """Cache key of a list of files: each one's path, byte size and modification time (a cheap
    stand-in for hashing every byte: any rewrite of a file changes its mtime), and what was
    hidden of them (--hide: cached apart from the whole films)."""
    h = hashlib.sha1(f"v{CACHE_VERSION} {mode}".encode())
    if hidden:  # whole films keep the key they always had
        h.update(f" hide {hidden.what} {hidden.box!r} {hidden.crop}".encode())
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else os.stat_result((0,) * 10)
        h.update(f"{os.path.abspath(p)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Films:
    """One split's decoded films: what training and evaluation read.

    images: {stage size: uint8 array (N, 1, T, T)}, each film whole, squished to the square
            (T = the size; larger in crop mode, see stored_size). Read from the cache, they
            are memory-mapped: nothing is in memory until a stage asks for its size (to()),
            and the ranks of a node share the pages the OS holds.
    hw:     (N,) float32, each film's height / width as decoded: where a crop may go
    rows:   the rows of `images` that are this split's (None: all of them)"""
    images: dict
    hw: torch.Tensor
    rows: np.ndarray = None

    def __len__(self):
        return len(self.hw)

    def subset(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        return Films(self.images, self.hw[idx], idx if self.rows is None else self.rows[idx])

    def nbytes(self, size):
        return len(self) * int(np.prod(self.images[size].shape[1:]))

    def take(self, size, j, out=None):
        """Films j (positions in this split) at `size`, as a uint8 array (len(j), 1, T, T),
        into `out` when given (pinned host memory, say). One copy from the (mapped) array."""
        rows = np.asarray(j, dtype=np.int64) if self.rows is None else self.rows[j]
        a = self.images[size]
        out = out if out is not None else np.empty((len(rows), *a.shape[1:]), np.uint8)
        return np.take(a, rows, axis=0, out=out, mode="clip")  # clip: unbuffered; rows valid

    def to(self, size, device, chunk=1 << 28):
        """This split at `size` as one uint8 tensor on `device`, copied about `chunk` bytes at
        a time: the host holds one chunk, never the whole stage."""
        a = self.images[size]
        out = torch.empty((len(self), *a.shape[1:]), dtype=torch.uint8, device=device)
        step = max(1, chunk // max(1, int(np.prod(a.shape[1:]))))
        for i in range(0, len(self), step):
            j = np.arange(i, min(i + step, len(self)))
            out[i:i + step] = torch.from_numpy(self.take(size, j))
        return out


def load_pixels(items, sizes, cache_dir=None, mode="squish", problems=None, hidden=WHOLE,
                skipped=None):
    """Films of `items` at every stage size, each file decoded once (mode: --resize; hidden:
    --hide's shortcuts.Hidden, its box blacked out as each film is decoded).

    Cached in cache_dir (never next to the data, which may be read-only), keyed by the files,
    the mode and the size: a second run reads the cache and decodes nothing. Unreadable images
    raise a DataError or, given a Problems list, are added to it; None is then returned
    whenever the list is not empty (if it already was, the images are only checked, at a tiny
    size). Images smaller than a size are upscaled to it, with a warning. Given a `skipped`
    list instead (evaluate.py), they are left out: (index in items, path, why) appended to it
    for each, the films returned are the others', and nothing is cached."""
    sizes = sorted(set(sizes))
    if items.pixels is not None:  # phantoms: square films, resized on the CPU
        x = torch.from_numpy(hidden.apply(items.pixels)).unsqueeze(1).float()  # once, all sizes
        return Films({s: square(x, s).numpy() for s in sizes}, torch.ones(len(items)))
    check_only = bool(problems)  # the data set is unusable already: find the rest quickly
    key = fingerprint(items.paths, mode, hidden) if cache_dir and not check_only else None
    cached = {s: key and os.path.join(cache_dir, f"{key}-{s}.npy") for s in ["dims", *sizes]}
    # (N, 2) width and height of each film
    out, dims = {}, read_cached(cached["dims"], (len(items), 2)) if key else None
    if dims is not None:
        dims = np.array(dims)
        # memory-mapped: read from disk (or the page cache) only where a stage reads it
        out = {s: read_cached(cached[s], len(items)) for s in sizes}  # None: decoded below
    todo = [8] if check_only else [s for s in sizes if out.get(s) is None]
    if todo:
        aspect = 1.0 if mode == "squish" or check_only else film_aspect(items.paths)
        store = [stored_size(s, mode, aspect) for s in todo]
        n = len(items.paths)
        bar = dict(total=n, unit="img", disable=None,  # None: a bar on a terminal alone
                   desc=f"checking {n} images" if check_only else f"decoding {n} images at "
                   f"{store} px")
        # Each film goes straight into its place in one array per size: in the cache file
        # itself (memory-mapped, written as the films come) when there is a cache, so that
        # host memory never holds the decoded data set, whatever its size.
        if key:
            os.makedirs(cache_dir, exist_ok=True)
        tmp = {s: f"{cached[s]}.{os.getpid()}.tmp" if key else None for s in ["dims", *todo]}
        arrays = {s: np.lib.format.open_memmap(tmp[s], "w+", np.uint8, (n, 1, t, t)) if key
                  else np.empty((n, 1, t, t), np.uint8) for s, t in zip(todo, store)}
        dims, bad = np.zeros((n, 2), np.int32), []
        try:
            with decode_all(items.paths, store, os.cpu_count(), hidden) as results:
                for i, (path, r) in enumerate(tqdm(zip(items.paths, results), **bar)):
                    if isinstance(r, str):
                        bad.append((i, path, r))
                        continue
                    dims[i] = r[0]
                    for k, s in enumerate(todo):
                        arrays[s][i, 0] = r[1][k]
            found = Problems()
            found.add("images could not be read", [f"{p} ({why})" for _, p, why in bad],
                      " (replace them, or remove them from the split file)")
            if skipped is not None and bad and len(bad) < n:  # left out by the caller; not
                skipped += bad  # cached, or they would not be found again
                key = None
            elif problems is None:
                found.check()
            elif problems or found:
                problems += found
                return None
            for s in todo:
                if key:
                    arrays[s].flush()
                    del arrays[s]
                    publish(tmp[s], cached[s])
                    out[s] = np.load(cached[s], mmap_mode="r")
                else:  # in memory (a copy, where it was the cache's temporary file)
                    out[s] = np.array(arrays[s]) if tmp[s] else arrays[s]
            if key:
                with open(tmp["dims"], "wb") as f:  # np.save would add .npy to the name
                    np.save(f, dims)
                publish(tmp["dims"], cached["dims"])
        finally:
            arrays.clear()
            for t in tmp.values():
                if t and os.path.exists(t):
                    os.remove(t)
    paths = items.paths
    if skipped:  # the films read, alone
        keep = np.setdiff1d(np.arange(len(items)), [i for i, _, _ in skipped])
        paths, dims = [paths[i] for i in keep], dims[keep]
        out = {s: a[keep] for s, a in out.items()}
    warn_small(paths, dims, max(sizes))
    warn_blank(paths, out[sizes[0]])
    dims = torch.from_numpy(dims).float()
    return Films(out, dims[:, 1] / dims[:, 0])


def crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def publish(tmp, path):
    """Cache file tmp, written, becomes path, with path.crc32 (its CRC-32, checked at each
    read) beside it: each by an atomic rename, so a killed run leaves no half-written cache."""
    with open(f"{path}.crc32.{os.getpid()}.tmp", "w") as f:  # runs may share a cache
        f.write(str(crc32(tmp)))
    os.replace(f.name, f"{path}.crc32")
    os.replace(tmp, path)


def read_cached(path, rows):
    """A cache file, memory-mapped, or None when it is not there or damaged (truncated, bytes
    changed: its CRC-32 or shape is wrong), then removed so that it is decoded again.
    rows: its expected number of films, or its expected shape. Reading it once for the CRC
    costs about a second per GB; training reads it all anyway."""
    if not os.path.isfile(path):
        return None
    try:
        with open(f"{path}.crc32") as f:
            want = int(f.read())
        a = np.load(path, mmap_mode="r")
        shape_ok = a.shape == rows if isinstance(rows, tuple) else len(a) == rows
        if shape_ok and crc32(path) == want:
            return a
        why = "its shape" if not shape_ok else "its checksum"
    except (OSError, ValueError, EOFError) as e:  # no .crc32, truncated, not an .npy
        why = f"{type(e).__name__}: {e}"
    print(f"warning: film cache {path} is damaged ({why}); decoding the films again")
    for f in (path, f"{path}.crc32"):
        with suppress(FileNotFoundError):  # another run sharing the cache removed it first
            os.remove(f)
    return None


# Starting a process pool costs about 3 s (2 CPU cores): each worker's interpreter imports torch
POOL_START_S = 3.0


def decode_all(paths, store, workers, hidden=WHOLE, first=32):
    """decode() of every path (hidden: --hide), in order. The first ones are decoded here and
    timed; the rest go to a process pool on all cores when they would take longer than
    starting one, else they are decoded here too: a few hundred small films decode in less
    time than a pool takes to start."""
    def results():
        t0 = time.time()
        yield from (decode(p, store, hidden) for p in paths[:first])
        per_film = (time.time() - t0) / max(1, min(first, len(paths)))
        rest = paths[first:]
        if workers > 1 and per_film * len(rest) > POOL_START_S:
            with process_pool(workers) as pool:
                yield from pool.map(decode, rest, repeat(store), repeat(hidden), chunksize=16)
        else:
            yield from (decode(p, store, hidden) for p in rest)
    return closing(results())  # closed, a pool still running shuts down


def process_pool(workers=None):
    """A process pool whose workers start from a fresh server process (forkserver), not as
    forks of this one: a fork copies CUDA's, OpenMP's and the compiler's threads in whatever
    state they are in, and can hang.

    The server imports this module (torch included) and the main script once, and every worker
    starts as a fork of it, its imports done. (Python 3.11's forkserver neither preloads
    '__main__' nor passes sys.path, hence the module name and PYTHONPATH set here.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's
    path = os.environ.get("PYTHONPATH", "")
    if root not in path.split(os.pathsep):  # for the server, started with this environment
        os.environ["PYTHONPATH"] = os.pathsep.join([root, path] if path else [root])
    main = getattr(sys.modules["__main__"], "__file__", None) or ""
    preload = ["machinery.films"]
    if os.path.dirname(os.path.abspath(main)) == root and main.endswith(".py"):
        preload.append(os.path.basename(main)[:-3])  # train, bench, ...: its imports
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    # one thread each: the workers are as many as the cores already
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads,
                               initargs=(1,))


def warn_blank(paths, images):
    """Say which films have no contrast at all (every pixel alike): a blank page or a failed
    export, which trains and tests as if it were a film. images: uint8 (N, 1, T, T)."""
    flat = np.asarray(images).reshape(len(images), -1)
    blank = [p for p, lo, hi in zip(paths, flat.min(1), flat.max(1)) if lo == hi]
    if blank:
        print(f"warning: {len(blank)} of {len(paths)} images have no contrast at all (every "
              f"pixel alike: not a film?), e.g. {', '.join(blank[:3])}")


def warn_small(paths, dims, size):
    """Say which images are upscaled to `size`: they come out softer than the rest."""
    small = [f"{p} ({w}x{h})" for p, (w, h) in zip(paths, dims.tolist()) if min(w, h) < size]
    if small:
        print(f"warning: {len(small)} of {len(paths)} images are smaller than {size} px and are "
              f"upscaled to it (softer than the rest), e.g. {', '.join(small[:3])}")
