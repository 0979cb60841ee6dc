"""One writer per run folder: a lock the operating system lets go of when its process ends.

    refuse_if_held(run_dir)   # train.py, lrfind.py at the start: stop now if it is being written
    hold(run_dir)             # before the first write (rank 0), ablate.py: this process's alone
    release(run_dir)          # the run is whole (report.write_outputs); at exit in any case
    writer(run_dir)           # readers: None, or who is writing it (host, pid, start, command)
    check_not_written(path)   # evaluate, predict, export, report, compare: refuse it if so

The lock is an advisory file lock (flock) on run_dir/.lock, held as long as the process
lives: a run killed with SIGKILL, or a machine that reboots, leaves no stale lock behind, only
the file, which means nothing by itself. Its text says who holds it, for the message. Two
processes on one folder would otherwise both append to metrics.jsonl and write over each
other's checkpoints and report. Where the operating system has no flock (Windows), nothing is
locked.
"""
import atexit
import json
import os
import shlex
import socket
import sys
import time

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; nothing is locked
    fcntl = None

from machinery.datasets import DataError

LOCK = ".lock"
_held = {}  # real path of a run folder -> the open lock file of this process


def _says(run_dir, who):
    return (f"{run_dir} is being written by another process ({who.get('command', '?')}, "
            f"pid {who.get('pid', '?')} on {who.get('host', '?')}, since "
            f"{who.get('started', '?')})")


def writer(run_dir):
    """None when no other process holds run_dir's lock; else what its lock file says of its
    holder ({} when it has not said yet)."""
    path = os.path.join(run_dir, LOCK)
    if fcntl is None or os.path.realpath(run_dir) in _held or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # no one holds it (closing the file lets go of this shared lock)
            except BlockingIOError:  # held: who holds it (written just after the lock is taken)
                for _ in range(10):
                    f.seek(0)
                    try:
                        return json.loads(f.read())
                    except ValueError:  # not written yet, or half
                        time.sleep(0.05)
                return {}
    except OSError:  # not readable: say nothing rather than refuse a run
        return None


def refuse_if_held(run_dir, flag="--name"):
    """SystemExit naming the holder if another process is writing run_dir: at a run's start,
    before any work (hold() takes the lock itself, before the first write). flag: the flag
    that chooses another folder, if any."""
    who = writer(run_dir)
    if who is not None:
        raise SystemExit(f"{_says(run_dir, who)}. Wait for it to end (or stop it)"
                         + (f", or choose another {flag}" if flag else ""))


def hold(run_dir, flag="--name"):
    """Lock run_dir (it must exist) for this process, or SystemExit naming its holder."""
    key = os.path.realpath(run_dir)
    if fcntl is None or key in _held:
        return
    path = os.path.join(run_dir, LOCK)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            refuse_if_held(run_dir, flag)
            continue  # it ended between the two looks: try again
        except OSError as e:  # a file system without locks (some network mounts)
            f.close()
            print(f"warning: {path} cannot be locked ({e.strerror}): nothing stops another "
                  "process from writing this folder too")
            return
        if _same_file(path, f):  # still the file at `path` (release() removes it)
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": shlex.join([os.path.basename(sys.argv[0] or "python"),
                                               *sys.argv[1:]])[:300]}))
    f.flush()
    if not _held:
        atexit.unregister(release_all)  # once, whatever was held and let go before
        atexit.register(release_all)
    _held[key] = f


def release(run_dir):
    """Let go of run_dir (held by this process), removing its lock file (if it is still the
    one this process locked)."""
    f = _held.pop(os.path.realpath(run_dir), None)
    if f is not None:
        path = os.path.join(run_dir, LOCK)
        if _same_file(path, f):
            os.remove(path)
        f.close()  # unlocks


def release_all():
    """Every lock of this process (at exit: the locks go with it anyway, their files not)."""
    for key in list(_held):
        release(key)


def _same_file(path, f):
    try:
        return os.path.samestat(os.stat(path), os.fstat(f.fileno()))
    except OSError:  # gone
        return False


def check_not_written(path):
    """A DataError if the run folder of `path` (a folder or a file in one) is being written:
    its files are not whole yet (metrics, checkpoints, report)."""
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) or "."
    who = writer(run_dir)
    if who is not None:
        raise DataError(f"{_says(run_dir, who)}: its files are not whole yet. Read it once "
                        "that process has ended")
