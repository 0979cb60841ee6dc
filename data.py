"""What the network sees: chest films as uint8 tensors on the device, shuffled, augmented as
fastai v1 augments, cropped and normalised, one batch at a time.

    films = stage_films(run, 128)         # {split: (uint8 films, labels, shapes)} on the device
    for x, y in train_batches(run, films["train"], 128, 64, "s1_128_frozen").epoch(0): ...
    for x, n in eval_batches(images, 128, hw): ...    # evaluation: the centre crop

What it teaches: the airbench way of feeding a GPU. Each film was decoded once, to one-channel
uint8 at every stage size (machinery/films.py); a stage's films move to the device once; each
epoch draws its order (a device randperm) and all its augmentation at once (one torch.rand,
each film's geometry as one 3x3 matrix); a batch is then a handful of batched torch ops there:
a gather, one grid_sample for all of fastai v1's geometry *and* the crop, fastai's lighting in
logit space, ImageNet normalisation (about 14 kernels). No DataLoader, no worker processes.
Augment pins each law to fastai v1's get_transforms() (FIDELITY.md).

Where the rest lives: reading and checking COVIDx split files and ImageFolder trees, and the
patient-level validation split, in machinery/datasets.py; decoding and the cache in
machinery/films.py; films kept in host memory (--data-on cpu) in machinery/hostmem.py.
"""
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from machinery import ddp
from machinery.datasets import DataError
from machinery.hostmem import HostImages, on_host
from schedule import PAPER

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
    rotate: float = PAPER.rotate  # the laws' magnitudes and probabilities: schedule.Recipe's
    zoom: float = PAPER.zoom
    warp: float = PAPER.warp
    lighting: float = PAPER.lighting
    p_affine: float = PAPER.p_affine
    p_lighting: float = PAPER.p_lighting
    flip: bool = PAPER.flip

    UNIFORMS = 18  # uniform numbers draw() takes per image

    def draw(self, n, gen, device, rows=slice(None), steps=1):
        """`steps` batches' random parameters: a dict of (steps * n, ...) tensors, batch after
        batch, or of each batch's `rows`.

        Every transform's parameters are drawn for every image (those whose coin says no get
        the identity), so the generator advances the same amount whatever the coins say. All
        come from one torch.rand call (one kernel for a whole epoch), batch after batch, each
        batch's taken in the order the transforms use them: on the CPU the very numbers that
        one torch.rand call per transform and batch would give. Under torchrun each rank
        draws for the global batch of n films, so that every rank draws the same, and keeps
        the rows of its own films.
        """
        u = Uniforms(torch.rand(steps, self.UNIFORMS * n, device=device, generator=gen), n)
        flip = u.coin(0.5) & self.flip
        warp = (u.take(4) * 2 - 1) * self.warp * u.coin(self.p_affine)[..., None]
        angle = (u.take() * 2 - 1) * self.rotate * u.coin(self.p_affine)
        zoom = torch.where(u.coin(self.p_affine), 1 + u.take() * (self.zoom - 1), 1.0)
        zoom_at, crop_at = u.take(2), u.take(2)  # (x, y) in [0, 1]: fastai's (col_pct, row_pct)
        lo = math.log(1 - self.lighting)  # contrast: log-uniform in (1 - L, 1 / (1 - L))
        brightness = torch.where(u.coin(self.p_lighting),
                                 0.5 + (u.take() * 2 - 1) * self.lighting / 2, 0.5)
        contrast = torch.where(u.coin(self.p_lighting), torch.exp(lo - 2 * lo * u.take()), 1.0)
        assert u.used == u.numbers.shape[1]  # every number, each once
        p = dict(flip=flip, warp=warp, angle=angle, zoom=zoom, zoom_at=zoom_at,
                 crop_at=crop_at, brightness=brightness, contrast=contrast)
        return {k: v[:, rows].reshape(-1, *v.shape[2:]) for k, v in p.items()}

    def __call__(self, x, gen, size=None, hw=None, p=None):
        """x: (B, 1, T, T) float in [0, 1] -> (B, 1, size, size), transformed per image.

        hw: each film's height / width with --resize crop (None: squished films, no crop).
        p: parameters from draw(), or drawn here.
        """
        p = p or self.draw(len(x), gen, x.device)
        x = sample(x, film_matrix(p, hw), size or x.shape[-1])
        return lighting(x, p["brightness"], p["contrast"]) if self.lighting > 0 else x


class Uniforms:
    """One torch.rand call's numbers (steps, count * n), handed out in order, for n images."""

    def __init__(self, numbers, n):
        self.numbers, self.n, self.used = numbers, n, 0

    def take(self, *shape):
        """The next uniforms in [0, 1): (steps, n, *shape)."""
        start, self.used = self.used, self.used + self.n * math.prod(shape)
        return self.numbers[:, start:self.used].view(len(self.numbers), self.n, *shape)

    def coin(self, p):
        """(steps, n) booleans, each True with probability p."""
        return self.take() < p


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
    if torch.compiler.is_compiling():  # traced (export.py): the graph's own, never kept
        return torch.tensor(values, device=device)
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


def pixel_centres(size, device):
    """(1, size * size, 3): each output pixel's centre (x, y, 1) in [-1, 1], made once."""
    key = (device, "centres", size)
    if key in _CONST and not torch.compiler.is_compiling():
        return _CONST[key]
    ax = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=device)
    ys, xs = torch.meshgrid(ax, ax, indexing="ij")
    centres = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, size * size, 3)
    if not torch.compiler.is_compiling():  # traced (export.py): the graph's own, never kept
        _CONST[key] = centres
    return centres


def sample(x, H, size):
    """Read (B, 1, T, T) films at H(u) for each output pixel centre u: (B, 1, size, size)."""
    B = len(x)
    g = pixel_centres(size, x.device) @ H.transpose(1, 2)  # (B, size*size, 3)
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


# ---------------------------------------------------------------------------------------------
# Batches: a stage's films on the device, shuffled and augmented for training, centre-cropped
# for evaluation

class Batches:
    """Training batches (x, y) of `size` px from uint8 films (N, 1, T, T) and labels (N,).

    A new random order each pass (a device randperm), the partial last batch dropped (static
    shapes). hw: each film's height / width with --resize crop. Without aug, a crop is the
    centre one, as fastai v1 does. balance=True draws each class equally often instead, with
    replacement (COVID-Net's rebalancing of its few COVID-19 films).

    Under torchrun (world ranks) every rank draws the same order and the same augmentation
    for the global batch of world * batch_size films and keeps its own part (rank): an epoch
    sees each film at most once across the ranks, and 2 ranks x B see exactly the films and
    transforms 1 process x 2B sees. images may be a HostImages (--data-on cpu).
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

    def order(self):
        """This pass's film indices, on the device: a random permutation, or with --balance
        each film drawn with probability 1 / its class size, with replacement."""
        if self.balance:
            w = 1.0 / torch.bincount(self.labels).float()[self.labels]
            return torch.multinomial(w, len(self.labels), replacement=True, generator=self.gen)
        return torch.randperm(len(self.labels), device=self.labels.device, generator=self.gen)

    def __iter__(self):
        idx, n, B = self.order(), len(self), self.bs
        G = self.bs * self.world  # the global batch: one step's films on all ranks
        mine = slice(self.rank * B, (self.rank + 1) * B)  # this rank's part of it
        j = idx[:n * G].view(n, G)[:, mine].reshape(-1)  # this rank's films, batch by batch
        labels, hw = self.labels[j], None if self.hw is None else self.hw[j]
        # films in host memory (HostImages) gather there: their positions on the host, once
        take = j.cpu() if isinstance(self.images, HostImages) else j
        if self.aug:  # the epoch's draws, batch by batch, then its geometry in one go
            p = self.aug.draw(G, self.gen, self.labels.device, rows=mine, steps=n)
            H = film_matrix(p, hw)  # (n * B, 3, 3)
        for i in range(n):
            b = slice(i * B, (i + 1) * B)  # this batch's rows
            x = self.images[take[b]].float().div_(255)  # (B, 1, T, T) in [0, 1]
            if self.aug:  # one grid_sample: fastai v1's geometry and the crop; its lighting
                x = sample(x, H[b], self.size)
                if self.aug.lighting > 0:
                    x = lighting(x, p["brightness"][b], p["contrast"][b])
            else:
                x = view(x, self.size, None if hw is None else hw[b])
            yield normalize(x, self.cl), labels[b]


def train_batches(run, films, size, batch_size, tag):
    """The shuffled, augmented training batches of one phase (or LR sweep): `tag` seeds its
    draws, so that each phase has its own reproducible order (the same on every rank)."""
    images, labels, hw = films
    c = run.cfg
    aug = Augment(c.rotate, c.zoom, c.warp, c.lighting, c.p_affine, c.p_lighting,
                  c.flip) if c.aug else None
    return Batches(images, labels, batch_size, size, aug=aug, hw=hw, balance=c.balance,
                   seed=c.seed + zlib.crc32(tag.encode()), channels_last=run.channels_last,
                   rank=ddp.rank(), world=ddp.world())


def eval_batches(images, size, hw=None, batch_size=256, pad=False, transform=None,
                 channels_last=False):
    """Evaluation's batches (x, n) of uint8 films (N, 1, T, T): x normalised, its first n rows
    the films in order. Each is seen as evaluation sees it (view: with --resize crop, hw each
    film's height / width, the centre crop), or through transform(x, hw) -> (B, 1, size,
    size), one pass of test-time augmentation. pad: the last batch padded with zeros to
    batch_size, one static shape for a compiled model (no recompilation)."""
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().div_(255)
        n, h = len(x), None if hw is None else hw[i:i + batch_size]
        x = transform(x, h) if transform else view(x, size, h)
        if pad and n < batch_size:
            x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
        yield normalize(x, channels_last), n


def stage_films(run, size):
    """{split: (uint8 films, labels, height/width or None)} at one stage's size: the films
    moved to the device once, or left in host memory (HostImages) when --data-on says so;
    labels and shapes on the device. The films' shapes matter only to --resize crop."""
    crop, dev = run.cfg.resize == "crop", run.device
    nbytes = sum(f.nbytes(size) for f in run.films.values())
    host = on_host(nbytes, dev, run.cfg.data_on, run.cfg.data_gpu_gib, f"at {size} px")
    return {k: (HostImages(f, size, dev) if host else f.to(size, dev),
                torch.tensor(run.items[k].labels, device=dev),
                f.hw.to(dev) if crop else None) for k, f in run.films.items()}
