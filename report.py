"""Write a training run's one-page report again: runs/<name>/report.md with its plots.

    python report.py runs/NAME

train.py writes it at the end of every run; this remakes it from the run's files (after
editing a plot, say). It reads config.json, metrics.jsonl, the LR-finder curves,
test_metrics.json and test_predictions.csv, and writes loss.png, accuracy.png,
confusion_matrix.png, roc.png and report.md.
"""
import argparse
import os

from machinery import runlock
from machinery.flags import Help
from machinery.datasets import run_cli
from machinery.report import write_report


def make_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, usage="%(prog)s RUN")
    p.add_argument("run", metavar="RUN",
                   help="a finished run's folder (it holds test_metrics.json)")
    return p


def main(argv=None):
    p = make_parser()
    a = p.parse_args(argv)
    runlock.check_not_written(a.run)  # a run being trained: its files are not whole
    need = [f for f in ("config.json", "metrics.jsonl", "test_metrics.json",
                        "test_predictions.csv") if not os.path.isfile(os.path.join(a.run, f))]
    if need:
        p.error(f"{a.run}: not a finished run folder (no {', '.join(need)}); train.py writes "
                "them at the end of a run")
    path = write_report(a.run)
    print(path)
    return path


if __name__ == "__main__":
    run_cli(main)
