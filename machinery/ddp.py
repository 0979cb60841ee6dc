"""Data-parallel training under torchrun: one process ("rank") per GPU, on one or several nodes.

    torchrun --nproc_per_node=8 train.py --data PATH          # one node, 8 GPUs
    python train.py --data PATH                               # one process: all of this is a no-op

Every rank runs train.py whole, on its own GPU (LOCAL_RANK picks it) with the whole stage's
films; at each step all ranks draw the same global permutation and augmentation and take
their slice (data.py), DistributedDataParallel averages the gradients, and the optimizers
stay in step. What is reported is computed from all ranks' results (all_mean, gather_rows)
and written by rank 0 alone (main()). A rank that fails ends the job: torchrun stops the
node's other ranks, what rank 0 alone does (its files: on_main()) is checked by every rank
(fail_together()), every collective has a timeout (--dist-timeout), so none waits forever,
and the process group is left however train.py ends (run_main(), closing()). The tutorial
files call on_main, MeanLoss and run_main by name, and shard and gather_rows in evaluation.
docs/torchrun-and-memory.md says how to launch it and what it changes.
"""
import builtins
import datetime
import os
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from machinery.datasets import run_cli

# The collectives' timeout (init() sets --dist-timeout's). A node's first rank decoding the
# films while the others wait may take longer than any other wait: node_first() gives it
# NODE_FIRST_WAIT times as long (an hour at the default 600 s).
TIMEOUT = datetime.timedelta(seconds=600)
NODE_FIRST_WAIT = 6
_GROUPS = {}  # process groups made once a run (node_first's); leave() forgets them


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def main():
    """Rank 0: the one that writes the run folder and prints."""
    return rank() == 0


def local_main():
    """A node's first rank: the one that decodes the node's films into the cache."""
    return not dist.is_initialized() or int(os.environ.get("LOCAL_RANK", "0")) == 0


def init(device, timeout_s=600.0):
    """Join torchrun's process group when it launched several processes, and return the
    device name this rank trains on: cuda:LOCAL_RANK (NCCL) or the CPU (gloo). A no-op (the
    name as given) in a plain `python train.py`.

    A collective that waits timeout_s for a rank fails: with gloo it raises; with NCCL the
    watchdog ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, 3 by default), and torchrun
    then stops the node's other ranks."""
    global TIMEOUT
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():  # one process
        return device
    TIMEOUT = datetime.timedelta(seconds=timeout_s)
    local = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if device not in ("auto", "cuda"):
            raise SystemExit(f"--device {device} under torchrun: each process takes the GPU "
                             "its LOCAL_RANK names; give --device cuda (or auto), and choose "
                             "GPUs with CUDA_VISIBLE_DEVICES")
        if local >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local}: this node has {torch.cuda.device_count()} "
                             "GPU(s); start at most that many processes per node")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # device_id: NCCL binds this rank to its GPU now (a barrier need not guess it)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                            device_id=torch.device(device) if cuda else None)
    print_on_main()  # one log, rank 0's (as torchvision's references do)
    return device


def print_on_main():
    """print() prints on rank 0 only, and on any rank as print(..., force=True)."""
    show, main_rank = builtins.print, main()

    def print(*args, force=False, **kw):
        if main_rank or force:
            show(*args, **kw)
    builtins.print = print


def progress(iterable=None, desc="", **kw):
    """A tqdm progress bar, shown on rank 0 only (the others' would overwrite it), and only on a
    terminal: a log file gets the lines printed, not the bar's frames."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if main() else True, **kw)


@contextmanager
def node_first():
    """The block runs on a node's first rank, which decodes the films into the cache, then on
    the node's other ranks, which read it. A no-op in one process.

    Its waits take NODE_FIRST_WAIT times --dist-timeout: decoding a large data set is a run's
    longest wait (~5 minutes for 224,000 1024-px PNGs on 16 cores), the others' turn (cache
    read, audit) the next. A barrier takes its group's timeout: this one's, a group of its
    own, is made by every rank the first time and kept until the run's end (gloo can fail a
    rank that tears a group down right after a barrier: pytorch/gloo#155)."""
    if world() == 1:
        yield
        return
    if "slow" not in _GROUPS:
        _GROUPS["slow"] = dist.new_group(timeout=TIMEOUT * NODE_FIRST_WAIT)
    slow = _GROUPS["slow"]
    if not local_main():
        dist.barrier(group=slow)
    yield
    if local_main():
        dist.barrier(group=slow)
    dist.barrier(group=slow)  # the others' turn: the first ranks wait for it as long


def _reduced(t, op=dist.ReduceOp.SUM):
    """A copy of t reduced over the ranks (the caller's tensor is left as it was)."""
    t = t.detach().clone()
    dist.all_reduce(t, op=op)
    return t


def all_mean(t):
    """The mean over ranks of a tensor (a new tensor; the same on every rank)."""
    return t if world() == 1 else _reduced(t) / world()


def all_min(t):
    return t if world() == 1 else _reduced(t, dist.ReduceOp.MIN)


def shard(n, r=None):
    """Rank r's rows [lo, hi) of n (default: this rank's): contiguous, balanced (the sizes
    differ by one at most; with fewer rows than ranks, some ranks have none)."""
    r = rank() if r is None else r
    return r * n // world(), (r + 1) * n // world()


def gather_rows(x, n):
    """Every rank's shard(n) rows of x, concatenated in rank order: (n, ...) on every rank.
    x lives on the rank's device (NCCL gathers GPU tensors only), even when it has no rows."""
    if world() == 1:
        return x
    padded = x.new_zeros(-(-n // world()), *x.shape[1:])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:hi - lo] for r, p in enumerate(parts) for lo, hi in [shard(n, r)]])


@contextmanager
def fail_together():
    """The block runs on every rank; if it fails on any rank, every rank stops with that rank's
    error. What rank 0 does alone (`if ddp.main():` its files) goes in such a block: a rank that
    failed alone would leave the others waiting at their next collective (on other nodes, which
    torchrun does not stop at once, until --dist-timeout). The block must hold no collective.
    One process: the block's exceptions as they are."""
    if world() == 1:
        yield
        return
    err = None
    try:
        yield
    except SystemExit as e:
        err = f"rank {rank()}: {e}"
    except Exception as e:
        err = f"rank {rank()}: {type(e).__name__}: {e}"
    errors = all_objects(err)
    if any(errors):
        raise SystemExit(next(e for e in errors if e))


def on_main(fn, *args, **kw):
    """fn(*args, **kw) on rank 0 alone (what it writes is written once), every rank failing
    together if it fails there (fail_together); its result on every rank. One process: fn's
    call, as it is. The recipe's files call this where rank 0 saves or writes."""
    out = None
    with fail_together():
        if main():
            out = fn(*args, **kw)
    return all_objects(out)[0]  # rank 0's result (any picklable value), on every rank


class MeanLoss:
    """A training step whose loss is the mean over ranks: under torchrun the global batch's
    (the LR range test's curve, lrfind.py), in one process the step's own. step(x, y) -> the
    loss tensor (model.train_step on the run's model and optimizer)."""

    def __init__(self, step, run):
        self.step, self.run = step, run

    def __call__(self, x, y):
        r = self.run
        return all_mean(self.step(r.forward, r.opt, x, y, r.amp_dtype, r.loss_weight))


def all_objects(obj):
    """Every rank's `obj` (picklable), as a list in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def seed_rank(seed):
    """Each rank its own stream of torch's global generators, which only the head's dropout
    draws from during training (batches and augmentation have their own, shared generator):
    the ranks draw different masks, as one process would for the global batch. Rank 0 keeps
    `seed`'s stream, so one process is unchanged."""
    if rank() > 0:
        torch.manual_seed(seed + 7919 * rank())  # the CPU's and every GPU's


def broadcast_buffers(model):
    """Rank 0's BatchNorm statistics on every rank. Each rank's last forward updates them
    from its own batch (as DDP's broadcast_buffers does at the next forward, which the last
    step has none of): evaluation and checkpoints use rank 0's, on every rank."""
    if world() > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def check_same_model(model):
    """True when every rank holds rank 0's weights and buffers, as it must after training
    (one process: always); an error naming the largest difference otherwise."""
    if world() == 1:
        return True
    worst = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for t in [*model.parameters(), *model.buffers()]:
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (t.detach() - ref).abs().max().double())
    differ = _reduced(worst, dist.ReduceOp.MAX).item()
    if differ:
        raise RuntimeError(f"the ranks' models differ after training (by up to {differ:.3g}): "
                           "their steps were not the same")
    return True


def wrap(module, device):
    """DistributedDataParallel around the module the step calls, made anew at each phase:
    DDP registers the parameters that train when it is made, and freezing or unfreezing the
    body changes them. Parameters are broadcast from rank 0 (they are already equal)."""
    if world() == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients
    (each rank's loss depends on every rank's contribution). torch's own
    (distributed.nn.functional.all_reduce) warns that it is deprecated from torch 2.14."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


@torch.compiler.disable  # eager always: torch 2.11 compiles its gradient to zeros (2.14 not)
def sum_over_ranks(x):
    return _SumOverRanks.apply(x)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch, for ranks on the CPU (gloo): torch's SyncBatchNorm
    runs on GPUs only. The per-channel sums of x and x^2 are all-reduced (with their
    gradients), so each rank normalises with the statistics of every rank's batch together,
    as one process with the whole batch would. Same parameters and buffers as BatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected a batch of 2 or more dimensions, got {x.dim()}")

    def forward(self, x):
        if not self.training or world() == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        stats = sum_over_ranks(torch.stack([xf.sum(dims), (xf * xf).sum(dims)]))
        count = x.numel() // x.shape[1] * world()  # every rank's batch has the same shape
        mean, var = stats[0] / count, stats[1] / count - (stats[0] / count) ** 2
        with torch.no_grad():  # as F.batch_norm: running variance unbiased
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / max(1, count - 1),
                                              alpha=m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model, device):
    """--sync-bn: every BatchNorm normalises over the global batch (SyncBatchNorm on GPUs,
    CPUSyncBatchNorm on the CPU). Off by default, as in torchvision's references: each rank's
    batch is the recipe's batch, and its statistics are what one GPU would see."""
    if world() == 1:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in list(model.named_children()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            s = CPUSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine,
                                 m.track_running_stats)
            s.load_state_dict(m.state_dict())
            s.train(m.training)
            setattr(model, name, s)
        else:
            sync_batchnorm(m, device)
    return model


def node_cache_dir():
    """Where a node's ranks share the decoded films when --cache-dir is '': the ranks need a
    cache to share them, so this user's folder in the node's temporary directory, its files
    keyed by the data as in every cache. It is kept (a later job reuses it; two jobs running
    at once may share it): remove it when done."""
    return os.path.join(tempfile.gettempdir(), f"covid-resnet-ddp-cache-{os.getuid()}")


def run_main(main_fn, *args):
    """A script's main(*args) as every rank runs it: the process group left however it ends
    (closing), a data error said alone (datasets.run_cli), and under torchrun a failing rank's
    error reported whole (torch's record)."""
    with closing():
        return record(run_cli)(main_fn, *args)


@contextmanager
def closing():
    """The process group that init() joins in the block is left however the block ends: all
    ranks together (a barrier) when it returns, as a rank that tears its connections down
    while another still uses them can abort that one at exit; at once when it raises, as the
    other ranks may be gone, and a barrier would wait for them until --dist-timeout."""
    try:
        yield
    except BaseException:  # SystemExit and Ctrl-C too
        leave()
        raise
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            leave()


def leave():
    """Leave the process group now, waiting for no other rank. A failure to leave is said,
    not raised: the program is already ending, with the error that matters."""
    _GROUPS.clear()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()  # every group: the default one and node_first's
        except Exception as e:
            sys.stderr.write(f"leaving the process group: {type(e).__name__}: {e}\n")
