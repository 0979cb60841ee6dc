"""What bench.py measures and checks, beside it: no run of train.py ever imports it.

    measure.py    the measurements: loop ceiling vs real, cache, checkpoint, torchrun scaling
    gpucheck.py   the first run on a new GPU: every script as a user runs it, within a budget

A run's own machinery is in machinery/; these drive train.py, evaluate.py and predict.py from
the outside, as processes, or time its parts.
"""
