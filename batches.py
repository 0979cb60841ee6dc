"""Training batches made on the device from uint8 images: shuffle, augment, normalise.

    for x, y in Batches(images, labels, 64, aug=Augment()): ...

images is the (N, 1, S, S) uint8 tensor of one stage size (data.load_pixels), already on the
training device. Every step is a handful of batched torch ops there: a device randperm, one
grid_sample for all geometric augmentation, a logit-space lighting change, normalisation.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import DataError

# ImageNet statistics: the pre-trained body expects its inputs scaled this way.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Augment:
    """fastai v1's get_transforms() defaults, as batched torch ops on the device."""
    rotate: float = 10.0  # degrees, either way
    zoom: float = 1.1  # up to 1.1x magnification, centre drawn at random
    warp: float = 0.2  # perspective warp magnitude
    lighting: float = 0.2  # brightness and contrast change
    p_affine: float = 0.75  # probability of the geometric transform, per image
    p_lighting: float = 0.75
    flip: bool = False  # left-right flip moves the heart: off for radiographs by default

    def __call__(self, x, gen):
        """x: (B, 1, H, W) float in [0, 1] -> same shape and range, transformed per image."""
        B, _, H, W = x.shape
        rand = lambda *shape: torch.rand(*shape, device=x.device, generator=gen)
        on = (rand(B) < self.p_affine).float()  # the images that get the geometric transform
        ang = (rand(B) * 2 - 1) * math.radians(self.rotate) * on
        s = 1 / (1 + rand(B) * (self.zoom - 1) * on)  # <1: look at a smaller region
        tx, ty = [(rand(B) * 2 - 1) * (1 - s) for _ in range(2)]  # crop stays in the film
        px, py = [(rand(B) * 2 - 1) * self.warp / 2 * on for _ in range(2)]
        fx = torch.where(rand(B) < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(s)
        cos, sin = torch.cos(ang) * s, torch.sin(ang) * s
        # Homography from output to input coordinates in [-1, 1]: zoom/rotate, shift, warp
        M = torch.stack([cos * fx, -sin, tx, sin * fx, cos, ty, px, py, torch.ones_like(s)], 1)
        M = M.view(B, 3, 3)
        ys, xs = torch.meshgrid(torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=x.device),
                                torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=x.device),
                                indexing="ij")
        base = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, H * W, 3)
        g = base @ M.transpose(1, 2)  # (B, H*W, 3)
        grid = (g[..., :2] / g[..., 2:]).view(B, H, W, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
        if self.lighting > 0:  # in logit space, as fastai: stays inside (0, 1)
            on = (rand(B, 1, 1, 1) < self.p_lighting).float()
            b = 0.5 + (rand(B, 1, 1, 1) * 2 - 1) * self.lighting / 2 * on
            lo = math.log(1 - self.lighting)
            c = torch.exp((rand(B, 1, 1, 1) * -2 * lo + lo) * on)  # log-uniform (0.8, 1.25)
            x = torch.sigmoid(torch.logit(x.clamp(1e-4, 1 - 1e-4)) * c + torch.logit(b))
        return x


_STATS = {}  # device -> (mean, std) tensors, made once rather than copied every batch


def normalize(x, channels_last=False):
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) ImageNet-normalised, the body's input."""
    if x.device not in _STATS:
        _STATS[x.device] = [torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD)]
    mean, std = _STATS[x.device]
    x = (x - mean) / std  # broadcasting makes the three channels
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Batches:
    """Training batches (x, y) from uint8 images (N, 1, S, S) and labels (N,) on the device.

    A new random order each pass (device randperm) and the partial last batch dropped (static
    shapes); balance=True draws each class equally often instead, with replacement (COVID-Net's
    rebalancing of its few COVID-19 films). Evaluation uses train.class_logits instead.
    """

    def __init__(self, images, labels, batch_size, aug=None, balance=False, seed=0,
                 channels_last=False):
        self.images, self.labels, self.bs = images, labels, batch_size
        self.aug, self.balance, self.cl = aug, balance, channels_last
        self.gen = torch.Generator(device=images.device).manual_seed(seed)
        if len(labels) < batch_size:
            raise DataError(f"{len(labels)} training images are fewer than one batch "
                            f"({batch_size}); lower --batch-size")

    def __len__(self):
        return len(self.labels) // self.bs

    def __iter__(self):
        n = len(self.labels)
        if self.balance:  # weight each image by 1 / its class size
            w = 1.0 / torch.bincount(self.labels).float()[self.labels]
            idx = torch.multinomial(w, n, replacement=True, generator=self.gen)
        else:
            idx = torch.randperm(n, device=self.images.device, generator=self.gen)
        for i in range(len(self)):
            j = idx[i * self.bs:(i + 1) * self.bs]
            x = self.images[j].float().div_(255)
            if self.aug is not None:
                x = self.aug(x, self.gen)
            yield normalize(x, self.cl), self.labels[j]
