"""plot_curves.py: curves of several runs side by side, and the table of their final metrics."""
import argparse
import json
import sys

import pytest
from PIL import Image

from conftest import REPO_ROOT, run_cmd
import plot_curves
import tracking
import utils


def write_run(folder, losses, knn_every=2):
    folder.mkdir(parents=True)
    with open(folder / "log.txt", "w") as f:
        for epoch, loss in enumerate(losses):
            record = {"train_loss": loss, "train_lr": 1e-3 * epoch, "epoch": epoch}
            if (epoch + 1) % knn_every == 0:
                record["knn_top1"] = 10.0 * epoch
            f.write(json.dumps(record) + "\n")
        f.write('{"train_loss": 0.1, "epo')  # a line cut short by a crash is skipped
    return folder


def test_final_metrics_and_table(tmp_path):
    a = write_run(tmp_path / "a", [5.0, 4.0, 3.0])
    b = write_run(tmp_path / "b", [6.0, 5.5], knn_every=1)
    runs = [tracking.read_log(str(a)), tracking.read_log(str(b / "log.txt"))]
    assert len(runs[0]) == 3
    # k-NN ran at epoch 1 only for run a: the table shows that last value, not a blank
    assert plot_curves.final_metrics(runs[0]) == {"train_loss": 3.0, "train_lr": 2e-3, "epoch": 2, "knn_top1": 10.0}
    table = plot_curves.metrics_table(["a", "b"], runs).splitlines()
    assert table[0].split() == ["run", "epoch", "train_loss", "knn_top1"]
    assert table[1].split() == ["a", "2", "3", "10"] and table[2].split() == ["b", "1", "5.5", "10"]


def test_comparison_of_three_runs_shows_loss_accuracy_and_lr(tmp_path):
    pytest.importorskip("matplotlib")
    runs = []
    for i, name in enumerate(("lr_low", "lr_mid", "lr_high")):
        run = tmp_path / name
        run.mkdir()
        with open(run / "log.txt", "w") as f:
            for epoch in range(4):
                f.write(json.dumps({"train_loss": 5.0 - 0.1 * i * epoch, "train_lr": 1e-4 * (i + 1),
                                    "train_wd": 0.04, "train_teacher_momentum": 0.996, "train_images_per_sec": 100.0,
                                    "epoch": epoch, **({"knn_top1": 20.0 + i * epoch} if epoch % 2 else {})}) + "\n")
            f.write('{"train_loss": 0.1, "epo')  # a line cut short by a crash is skipped
        runs.append(run)
    out = tmp_path / "cmp.png"
    proc = run_cmd([sys.executable, REPO_ROOT / "plot_curves.py", *runs, "--output", out])
    assert proc.stdout.splitlines()[0].split() == ["run", "epoch", "train_loss", "knn_top1"]
    assert proc.stdout.splitlines()[3].split() == ["lr_high", "3", "4.4", "26"]
    assert f"Curves: {out}" in proc.stdout
    width, height = Image.open(out).size
    assert width > 1000 and height < 450, "one row: loss, k-NN top-1, lr, under one legend"
    plot_curves.main(argparse.Namespace(runs=[str(r) for r in runs], output=str(out), labels=None, keys=None,
                                        all=True))
    assert Image.open(out).size[1] > 1.5 * height, "--all: every metric (6 panels in 2 rows)"


def test_a_run_that_does_not_exist_is_an_error(tmp_path):
    args = argparse.Namespace(runs=[str(tmp_path / "nowhere")], output=None, labels=None, keys=None, all=False)
    with pytest.raises(utils.UserError, match="does not exist"):
        plot_curves.main(args)
