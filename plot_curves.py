# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Training curves of one or several runs, side by side, and a table of their final metrics.

    python plot_curves.py runs/dino_a runs/dino_b --output compare.png

Each argument is a run's output folder (or its log.txt). Training scripts already write
`training_curves.png` into their own folder every epoch; this is for finished runs and comparisons.
"""
import argparse
import os
from typing import Any, Dict, List, Sequence

import runtime
import tracking
import utils

TABLE_KEYS = ("epoch", "train_loss", "knn_top1", "knn_top5", "test_acc1", "rankme", "train_epoch_time")
# What a comparison shows by default (those the runs have): the loss, the accuracy, the training-health signals
# (teacher entropy, KL, prototypes in use, feature spread, RankMe), the learning rate.
COMPARE_KEYS = ("train_loss", "knn_top1", "test_acc1") + tracking.HEALTH_KEYS + ("train_lr",)


def final_metrics(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The last value of every key over a run's log (k-NN is not evaluated every epoch)."""
    last: Dict[str, Any] = {}
    for record in records:
        last.update(record)
    return last


def metrics_table(names: Sequence[str], runs: Sequence[Sequence[Dict[str, Any]]]) -> str:
    finals = [final_metrics(r) for r in runs]
    keys = [k for k in TABLE_KEYS if any(k in f for f in finals)]
    rows = [["run"] + keys]
    for name, final in zip(names, finals):
        row = [name]
        for k in keys:
            v = final.get(k, "")
            row.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(args: argparse.Namespace) -> None:
    names: List[str] = args.labels or [os.path.basename(os.path.normpath(
        os.path.dirname(p) if p.endswith(".txt") else p)) for p in args.runs]
    if len(names) != len(args.runs):
        raise utils.UserError(f"--labels gives {len(names)} names for {len(args.runs)} runs")
    runs = [tracking.read_log(p) for p in args.runs]
    print(metrics_table(names, runs))
    output = args.output or (os.path.join(args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(
        args.runs[0]), "training_curves.png") if len(args.runs) == 1 else "comparison.png")
    keys = args.keys or (None if args.all or len(args.runs) == 1 else COMPARE_KEYS)
    if tracking.plot_training_curves(args.runs, output, labels=names, keys=keys):
        print(f"Curves: {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Plot training curves of DINO runs")
    parser.add_argument("runs", nargs="+", help="output folders (or log.txt files) of the runs")
    parser.add_argument("--output", default=None, help="""PNG to write (default: the run's
        training_curves.png for one run, comparison.png for several).""")
    parser.add_argument("--labels", nargs="+", default=None, help="names of the runs in the legend and table")
    parser.add_argument("--keys", nargs="+", default=None, help="""log.txt keys to plot, one panel each
        (default: every key for one run; for several, the loss, k-NN top-1, linear top-1, the health signals
        and lr).""")
    parser.add_argument("--all", action="store_true", help="plot every numeric key, also for several runs")
    runtime.run_script(main, parser.parse_args())
