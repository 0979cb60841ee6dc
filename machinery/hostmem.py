"""Films too large for the device (--data-on cpu): a stage's films stay in host memory, or in
the memory-mapped cache, and each batch is gathered into pinned memory and copied over while
the device still works on the batches before it.

    if on_host(films.nbytes(128), device, "auto"): images = HostImages(films, 128, device)
    x = images[order[at]]                  # films order[at] (order on the host), on the device

data.py's batches and evaluation read a HostImages as they read the device tensor it stands
in for; docs/torchrun-and-memory.md has the memory model.
"""
import math

import numpy as np
import torch


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
        why = "" if budget == math.inf else (  # the CPU: nothing to weigh
            f" ({gib:.2f} GiB {'>' if host else '<='} {budget:.2f} GiB for films)")
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

    def __getitem__(self, j):
        """Films j as a device tensor: a slice (evaluation's batches, a rank's shard) or host
        positions (a training batch: its order brought to the host once a pass, not a batch)."""
        if isinstance(j, slice):
            j = np.arange(*j.indices(self.shape[0]))  # the slice's rows alone
        return self.gather(np.asarray(j))


def rows(images, lo, hi):
    """Films lo..hi-1 (a rank's shard of a split): a view of the device tensor, or a HostImages
    of those rows alone."""
    if isinstance(images, HostImages):
        return HostImages(images.films.subset(np.arange(lo, hi)), images.size, images.device)
    return images[lo:hi]
