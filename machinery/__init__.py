"""The run machinery: what a training run needs besides the recipe. The recipe itself is in the
five tutorial files beside this folder (train.py, lrfind.py, model.py, data.py, schedule.py);
they call what is here by name, and nothing here imports them but model.py and schedule.py.

    config.py      the knobs: one dataclass, its flags and --help groups, --recipe, --demo
    flags.py       a dataclass's fields as flags, --help, the knobs' checks, --config
    run.py         setup(): device, data read and split, model and optimizer, run folder
    epochs.py      fit()'s books: loss on the device, divergence guard, log, last.pt
    checkpoint.py  atomic checkpoints, snapshots written in the background, resume
    runlock.py     one writer per run folder: a lock that dies with its process
    datasets.py    COVIDx split files and ImageFolder trees, read and checked; patient split
    audit.py       duplicate films across splits, sources by class, the shortcut baseline
    covidx.py      COVIDx v1's two sources and rules (tools/make_covidx_v1.py)
    films.py       every film decoded once at every stage size, cached and memory-mapped
    hostmem.py     films too large for the device, batches copied from pinned host memory
    devices.py     device, precision, channels_last, torch.compile's break-even
    ddp.py         torchrun: process group, collectives, DDP, SyncBatchNorm
    metrics.py     accuracy, sensitivity, PPV, ... with Wilson intervals; ROC-AUC
    plots.py       PNG plots with Pillow alone
    report.py      report.md and the test split's files
    phantom.py     synthetic radiographs for the demo and the tests
bench.py's measurements and its first-GPU check are beside this package, in benchmarks/.
"""
