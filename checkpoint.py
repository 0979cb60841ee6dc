"""Checkpoints that survive crashes, and what it takes to resume a run bit for bit.

    save_checkpoint(run, path, **extra)   # atomic: temporary file, fsync, rename
    cfg, state = resume_from(cfg)         # the run folder's last.pt, for --resume
    check_writable(run_dir, need_bytes)   # before training, not at the first checkpoint
"""
import dataclasses
import os
import random
import shutil

import numpy as np
import torch

from config import Config


def check_writable(run_dir, need_bytes):
    """Fail now, not at the first checkpoint hours later, if run_dir cannot take the run."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"cannot write the run folder {run_dir} ({e.strerror}); choose "
                         "another with --runs DIR") from e
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        if not os.listdir(run_dir):
            os.rmdir(run_dir)
        raise SystemExit(f"{run_dir} has {free / 2**20:.0f} MiB free; the run's checkpoints "
                         f"need about {need_bytes / 2**20:.0f} MiB. Free space or use --runs DIR")


def save_checkpoint(run, path, **extra):
    """Weights, class names and config: loadable with torch.load(weights_only=True).

    Atomic: written to a temporary file, flushed to disk, then renamed over `path`, so a
    crash leaves the previous checkpoint whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"model": run.model.state_dict(), "classes": run.classes,
                        "config": dataclasses.asdict(run.cfg), **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: no half-written file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state():
    """Every random generator training draws from, in a form torch.save(weights_only) keeps."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def resume_from(cfg):
    """(config, saved state) to continue the run folder cfg.resume from its last.pt."""
    path = os.path.join(cfg.resume, "last.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {cfg.resume}: no last.pt there (it is written after every "
                         "epoch); nothing to resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = Config(**state["config"])
    # the same run folder, whatever name it was first given
    saved.runs, saved.name = os.path.split(os.path.normpath(cfg.resume))
    saved.resume = cfg.resume
    return saved, state
