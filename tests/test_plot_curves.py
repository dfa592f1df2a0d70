"""plot_curves.py: curves of several runs side by side, and the table of their final metrics."""
import json
import sys

import pytest
from PIL import Image

from conftest import REPO_ROOT, run_cmd
import plot_curves
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
    runs = [utils.read_log(str(a)), utils.read_log(str(b / "log.txt"))]
    assert len(runs[0]) == 3
    # k-NN ran at epoch 1 only for run a: the table shows that last value, not a blank
    assert plot_curves.final_metrics(runs[0]) == {"train_loss": 3.0, "train_lr": 2e-3, "epoch": 2, "knn_top1": 10.0}
    table = plot_curves.metrics_table(["a", "b"], runs).splitlines()
    assert table[0].split() == ["run", "epoch", "train_loss", "knn_top1"]
    assert table[1].split() == ["a", "2", "3", "10"] and table[2].split() == ["b", "1", "5.5", "10"]


def test_cli_plots_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / name, [5.0 - i, 4.0 - i, 3.0 - i]) for i, name in enumerate("xyz")]
    out = tmp_path / "cmp.png"
    proc = run_cmd([sys.executable, REPO_ROOT / "plot_curves.py", *runs, "--output", out])
    assert f"Curves: {out}" in proc.stdout and proc.stdout.splitlines()[0].split()[0] == "run"
    w, h = Image.open(out).size
    assert w > 1000 and h > 250  # three panels: loss, k-NN, lr
    proc = run_cmd([sys.executable, REPO_ROOT / "plot_curves.py", tmp_path / "nowhere"], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
