"""Training batches made on the device from uint8 films: shuffle, augment, crop, normalise.

    for x, y in Batches(images, labels, 64, 128, aug=Augment(), hw=hw): ...

images is the (N, 1, T, T) uint8 tensor of one stage size (films.Films), already on the
training device. Every step is a handful of batched torch ops there: a device randperm, one
grid_sample for all geometric augmentation *and* the crop, fastai's lighting in logit space,
normalisation. Evaluation takes its centre crop through the same code (view()).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data import DataError

# ImageNet statistics: the pre-trained body expects its inputs scaled this way.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Augment:
    """fastai v1's get_transforms() defaults (vision/transform.py), with its ResizeMethod.CROP.

    As in fastai v1, every transform draws its own coin per image: flip p 0.5, then warp,
    rotate and zoom each with p_affine, brightness and contrast each with p_lighting; the
    random crop always. draw() returns the parameters; __call__ applies them.
    """
    rotate: float = 10.0  # degrees, either way
    zoom: float = 1.1  # up to 1.1x magnification, its centre drawn at random
    warp: float = 0.2  # symmetric_warp: four corner offsets, each uniform in +-warp
    lighting: float = 0.2  # brightness 0.5 +- 0.1, contrast log-uniform in (0.8, 1.25)
    p_affine: float = 0.75  # probability of each geometric transform, per image
    p_lighting: float = 0.75
    flip: bool = True  # left-right, p 0.5 (fastai v1's do_flip); --no-flip keeps the heart left

    def draw(self, n, gen, device):
        """One batch's random parameters: a dict of (n, ...) tensors.

        Every transform's parameters are drawn for every image (those whose coin says no get
        the identity), so the generator advances the same amount whatever the coins say.
        """
        u = lambda *shape: torch.rand(n, *shape, device=device, generator=gen)
        coin = lambda p: u() < p
        flip = coin(0.5) & self.flip
        warp = (u(4) * 2 - 1) * self.warp * coin(self.p_affine)[:, None]
        angle = (u() * 2 - 1) * self.rotate * coin(self.p_affine)
        zoom = torch.where(coin(self.p_affine), 1 + u() * (self.zoom - 1), 1.0)
        zoom_at, crop_at = u(2), u(2)  # (x, y) in [0, 1]: fastai's (col_pct, row_pct)
        lo = math.log(1 - self.lighting)  # contrast: log-uniform in (1 - L, 1 / (1 - L))
        brightness = torch.where(coin(self.p_lighting),
                                 0.5 + (u() * 2 - 1) * self.lighting / 2, 0.5)
        contrast = torch.where(coin(self.p_lighting), torch.exp(lo - 2 * lo * u()), 1.0)
        return dict(flip=flip, warp=warp, angle=angle, zoom=zoom, zoom_at=zoom_at,
                    crop_at=crop_at, brightness=brightness, contrast=contrast)

    def __call__(self, x, gen, size=None, hw=None, p=None):
        """x: (B, 1, T, T) float in [0, 1] -> (B, 1, size, size), transformed per image.

        hw: each film's height / width with --resize crop (None: squished films, no crop).
        p: parameters from draw(), or drawn here.
        """
        p = p or self.draw(len(x), gen, x.device)
        x = sample(x, film_matrix(p, hw), size or x.shape[-1])
        return lighting(x, p["brightness"], p["contrast"]) if self.lighting > 0 else x


def _mat(rows):
    """(n, 3, 3) from a 3x3 nested list of (n,) tensors."""
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def crop_matrix(hw, at):
    """Output coords -> film coords of the square window fastai v1's ResizeMethod.CROP takes.

    The film, resized so its shorter side is the output size, spans [-1, 1] on both axes;
    the window spans all of the short axis and 1/aspect of the long one. at (n, 2) in [0, 1]
    places it along x and y (fastai's col_pct, row_pct): 0.5 is the centre crop of
    evaluation, uniform the random crop of training. hw None: no crop (squished films).
    """
    if hw is None:
        return torch.eye(3, device=at.device).expand(len(at), 3, 3)
    sx, sy = hw.clamp(max=1), (1 / hw).clamp(max=1)  # window / film, per axis
    z, one = torch.zeros_like(sx), torch.ones_like(sx)
    return _mat([[sx, z, (2 * at[:, 0] - 1) * (1 - sx)],
                 [z, sy, (2 * at[:, 1] - 1) * (1 - sy)], [z, z, one]])


_CONST = {}  # device -> constant tensors, made once (a copy to the GPU per batch would wait)


def _const(device, name, values):
    if (device, name) not in _CONST:
        _CONST[device, name] = torch.tensor(values, device=device)
    return _CONST[device, name]


def warp_matrix(m):
    """fastai v1's symmetric_warp as a homography: (n, 4) magnitudes -> (n, 3, 3).

    The corners (-1,-1), (-1,1), (1,-1), (1,1) are moved to targets that share the four
    magnitudes in pairs (vision/transform.py: _symmetric_warp); the homography maps the
    targets back onto the corners, as fastai's _find_coeffs solves it.
    """
    n = len(m)
    tx = torch.stack([-1 - m[:, 3], -1 - m[:, 2], 1 + m[:, 3], 1 + m[:, 2]], 1)  # (n, 4)
    ty = torch.stack([-1 - m[:, 1], 1 + m[:, 1], -1 - m[:, 0], 1 + m[:, 0]], 1)
    corners = _const(m.device, "corners", [[-1., -1., 1., 1.], [-1., 1., -1., 1.]])
    ox, oy = corners[0].expand(n, 4), corners[1].expand(n, 4)
    # two equations per corner: (a x + b y + c) / (g x + h y + 1) = ox, and the same for oy
    A = m.new_zeros(n, 8, 8)
    A[:, 0::2, 0], A[:, 0::2, 1], A[:, 0::2, 2] = tx, ty, 1
    A[:, 1::2, 3], A[:, 1::2, 4], A[:, 1::2, 5] = tx, ty, 1
    A[:, 0::2, 6], A[:, 0::2, 7] = -ox * tx, -ox * ty
    A[:, 1::2, 6], A[:, 1::2, 7] = -oy * tx, -oy * ty
    b = torch.stack([ox, oy], -1).reshape(n, 8)
    # solve_ex: no check of the result, hence no wait for the device (a square is never
    # singular at these magnitudes)
    c = torch.linalg.solve_ex(A, b)[0]
    return torch.cat([c, torch.ones_like(c[:, :1])], 1).view(n, 3, 3)


def film_matrix(p, hw):
    """Output coords -> film coords, all of fastai v1's geometry in one (n, 3, 3) matrix.

    fastai v1 applies, in its transforms' order: warp (coord), rotate and zoom (affine),
    flip (pixel), crop (last). A pixel u of the output is thus read from the film at
    M(W(F(C(u)))): C the crop window, F the flip, W the warp, M = rotate @ zoom with fastai's
    correction for non-square images (_affine_mult).
    """
    z, one = torch.zeros_like(p["angle"]), torch.ones_like(p["angle"])
    C = crop_matrix(hw, p["crop_at"])
    f = torch.where(p["flip"], -1.0, 1.0)
    Fl = _mat([[f, z, z], [z, one, z], [z, z, one]])
    W = warp_matrix(p["warp"])
    a = p["angle"] * math.pi / 180
    s = 1 / p["zoom"]
    c = (1 - s)[:, None] * (2 * p["zoom_at"] - 1)  # fastai's _zoom: where it zooms to
    cos, sin = torch.cos(a), torch.sin(a)
    M = _mat([[cos * s, -sin * s, cos * c[:, 0] - sin * c[:, 1]],
              [sin * s, cos * s, sin * c[:, 0] + cos * c[:, 1]], [z, z, one]])
    r = one if hw is None else hw  # rotate in pixels, not in the stretched [-1, 1] square
    M[:, 0, 1] *= r
    M[:, 1, 0] /= r
    return M @ W @ Fl @ C


def sample(x, H, size):
    """Read (B, 1, T, T) films at H(u) for each output pixel centre u: (B, 1, size, size)."""
    B = len(x)
    ax = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=x.device)
    ys, xs = torch.meshgrid(ax, ax, indexing="ij")
    base = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, size * size, 3)
    g = base @ H.transpose(1, 2)  # (B, size*size, 3)
    grid = (g[..., :2] / g[..., 2:]).view(B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def lighting(x, brightness, contrast):
    """fastai v1's brightness then contrast, in logit space: sigmoid((logit(x) + logit(b)) * c).

    brightness, contrast: (B,); 0.5 and 1 leave an image as it is."""
    b, c = brightness.view(-1, 1, 1, 1), contrast.view(-1, 1, 1, 1)
    return torch.sigmoid((torch.logit(x.clamp(1e-7, 1 - 1e-7)) + torch.logit(b)) * c)


def view(x, size, hw=None):
    """Evaluation's input: the centre crop with --resize crop (fastai v1's validation
    crop_pad), the film itself when squished. x: (B, 1, T, T) float -> (B, 1, size, size)."""
    if hw is None and x.shape[-1] == size:
        return x
    at = torch.full((len(x), 2), 0.5, device=x.device)
    return sample(x, crop_matrix(hw, at), size)


def normalize(x, channels_last=False):
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) ImageNet-normalised, the body's input."""
    mean = _const(x.device, "mean", MEAN).view(1, 3, 1, 1)
    std = _const(x.device, "std", STD).view(1, 3, 1, 1)
    x = (x - mean) / std  # broadcasting makes the three channels
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def on_host(nbytes, device, data_on="auto", gpu_gib=0.0, what=""):
    """--data-on: whether films of `nbytes` stay in host memory (HostImages) rather than on
    the device. auto: on the device when they take at most gpu_gib GiB (0: half the GPU's
    free memory; on the CPU the host is the device). Says which."""
    gib = nbytes / 2 ** 30
    if data_on == "auto":
        if device.type == "cuda":  # films freed before (the last stage's) still count as reserved
            torch.cuda.empty_cache()
        budget = gpu_gib or (torch.cuda.mem_get_info(device)[0] / 2 ** 31
                             if device.type == "cuda" else math.inf)
        host = gib > budget
        why = f" ({gib:.2f} GiB {'>' if host else '<='} {budget:.2f} GiB for films)"
    else:
        host, why = data_on == "cpu", " (--data-on)"
    print(f"films {what}: {gib:.2f} GiB, " + (
        "in host memory, each batch copied to the device" if host else "on the device") + why)
    return host


class HostImages:
    """A split's films at one size left in host memory (or in the memory-mapped cache), for
    --data-on cpu: indexed like the device tensor it stands in for, each batch is gathered
    into pinned memory and copied to the device without waiting (non_blocking), while the
    device still works on the batches queued before. A ring of `depth` pinned buffers: one
    is refilled only once its copy is done (a CUDA event), never while being read."""

    def __init__(self, films, size, device, depth=3):
        self.films, self.size, self.device = films, size, device
        self.pin = device.type == "cuda"
        self.shape = (len(films), *films.images[size].shape[1:])
        self.bufs, self.events, self.k = {}, [None] * depth, 0

    def __len__(self):
        return self.shape[0]

    def gather(self, j):
        """Films j (host int64 positions) as a uint8 tensor on the device."""
        if not self.pin:  # the CPU: the gathered array is the batch
            return torch.from_numpy(self.films.take(self.size, j))
        b = self.k % len(self.events)
        self.k += 1
        if self.events[b] is not None:
            self.events[b].synchronize()  # this buffer's last copy is done
        buf = self.bufs.get((b, len(j)))
        if buf is None:
            buf = self.bufs[b, len(j)] = torch.empty((len(j), *self.shape[1:]),
                                                     dtype=torch.uint8, pin_memory=True)
        self.films.take(self.size, j, out=buf.numpy())
        x = buf.to(self.device, non_blocking=True)
        self.events[b] = torch.cuda.Event()
        self.events[b].record()
        return x

    def part(self, lo, hi):
        """Films lo..hi-1 as their own HostImages (a rank's shard of a split)."""
        return HostImages(self.films.subset(np.arange(lo, hi)), self.size, self.device)

    def __getitem__(self, s):
        """A slice of films (evaluation's batches, a rank's shard) as a device tensor."""
        return self.gather(np.arange(*s.indices(self.shape[0])))  # the slice's rows alone


class Batches:
    """Training batches (x, y) of `size` px from uint8 films (N, 1, T, T) and labels (N,).

    A new random order each pass (device randperm) and the partial last batch dropped (static
    shapes); balance=True draws each class equally often instead, with replacement (COVID-Net's
    rebalancing of its few COVID-19 films). hw: each film's height / width with --resize crop.
    Without aug, a crop is the centre one, as fastai v1 does. Evaluation uses view() instead.

    Data-parallel (world ranks): every rank draws the same order and the same augmentation
    for the global batch of world * batch_size films, and takes its own slice (rank): an
    epoch sees each film at most once across the ranks (the partial last global batch is
    dropped), and 2 ranks x B see exactly the films and
    transforms 1 process x 2B sees. images may be HostImages (--data-on cpu): the order is
    still drawn on the device, and brought to the host once per epoch.
    """

    def __init__(self, images, labels, batch_size, size, aug=None, hw=None, balance=False,
                 seed=0, channels_last=False, rank=0, world=1):
        self.images, self.labels, self.bs, self.size = images, labels, batch_size, size
        self.aug, self.hw, self.balance, self.cl = aug, hw, balance, channels_last
        self.seed, self.rank, self.world = seed, rank, world
        self.gen = torch.Generator(device=labels.device).manual_seed(seed)
        if len(labels) < batch_size * world:
            raise DataError(f"{len(labels)} training images are fewer than one batch "
                            f"({batch_size}" + (f" per rank, {world} ranks" if world > 1
                                                else "") + "); lower --batch-size")

    def epoch(self, e):
        """Reseed for epoch e: its order and augmentation then depend on (seed, e) alone, so a
        run resumed at epoch e draws what the uninterrupted run drew, with no generator state
        to carry over (a CUDA generator's state would not load into a CPU one)."""
        self.gen.manual_seed(self.seed * 1_000_003 + e)
        return self

    def __len__(self):
        return len(self.labels) // (self.bs * self.world)

    def __iter__(self):
        n, dev = len(self.labels), self.labels.device
        if self.balance:  # weight each image by 1 / its class size
            w = 1.0 / torch.bincount(self.labels).float()[self.labels]
            idx = torch.multinomial(w, n, replacement=True, generator=self.gen)
        else:
            idx = torch.randperm(n, device=dev, generator=self.gen)
        host = isinstance(self.images, HostImages)
        order = idx.cpu().numpy() if host else None  # one wait per epoch, not per batch
        g, mine = self.bs * self.world, slice(self.rank * self.bs, (self.rank + 1) * self.bs)
        for i in range(len(self)):
            at = slice(i * g + mine.start, i * g + mine.stop)  # this rank's part of batch i
            j = idx[at]
            x = (self.images.gather(order[at]) if host else self.images[j]).float().div_(255)
            hw = None if self.hw is None else self.hw[j]
            if self.aug:  # drawn for the global batch, so that every rank draws the same
                p = {k: v[mine] for k, v in self.aug.draw(g, self.gen, dev).items()}
                x = self.aug(x, self.gen, self.size, hw, p)
            else:
                x = view(x, self.size, hw)
            yield normalize(x, self.cl), self.labels[j]
