"""tracking.py: the per-iteration history (written and read back), TensorBoard event files read back with
TensorBoard's own reader, W&B in offline mode (a run folder; the same run id after a resume), a missing
logger package in one line, and training runs of main_dino.py, main_distill.py and eval_linear.py that log,
are interrupted and resume into one continuous curve and one W&B run. (The comparison of runs that
plot_curves.py draws: test_plot_curves.py.)"""
import argparse
import glob
import importlib.util
import json
import os
import re
import signal
import sys
import time

import pytest
import torch

from conftest import (DINO_FAST, child_env, image_folder, main_dino as main_dino_cmd, parse, stop_when,
                      with_flags)
import tracking
import utils


def make_args(out, *flags):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default=str(out))
    parser.add_argument("--lr", default=0.1, type=float)  # a flag of the script, to be found in the config
    tracking.add_tracking_args(parser)
    args = parser.parse_args([str(f) for f in flags])
    tracking.check_args(args)
    return args


def make_tracker(args, **kwargs):
    """A Tracker as engine.Run makes one: the output folder, the tracking flags, the run's iterations."""
    return tracking.Tracker(args.output_dir, **tracking.options(args), **kwargs)


def train(tracker, iterations, first=0, loss_offset=0.0, epoch_every=5):
    """Fake training loop: iterations [first, iterations) through tracker.timed, as engine.py drives it."""
    with tracker:
        for it in tracker.timed(range(first, iterations)):
            if tracker.wants(it):
                tracker.log_iteration(it, {"loss": torch.tensor(loss_offset + it), "lr": 0.5 * it,
                                           "teacher_temp": 0.04},
                                      grad_norms=torch.tensor([3.0, 4.0]))
            if (it + 1) % epoch_every == 0:
                tracker.log_epoch(it, {"train_loss": loss_offset + it, "epoch": it // epoch_every, "note": "x"})
        state = tracker.state_dict()
    return state


def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)], accumulator.Tags()


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B's own files (settings, cache, artifacts) in the test's folder; no W&B server."""
    pytest.importorskip("wandb")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return monkeypatch


# ----------------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------------
def test_history_is_written_every_log_freq_and_read_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    args = make_args(out, "--log_freq", 3)
    tracker = make_tracker(args, start_iteration=0, iters_per_epoch=5, images_per_batch=8)
    assert train(tracker, 10) == {}  # no W&B: nothing to keep in the checkpoint
    history = tracking.read_history(str(out), as_dataframe=False)
    assert history["iteration"] == [0, 3, 6, 9]
    assert history["epoch"] == [0, 0, 1, 1]
    assert history["loss"] == [0.0, 3.0, 6.0, 9.0]  # device values, read a logging period later
    assert history["lr"] == [0.0, 1.5, 3.0, 4.5] and history["teacher_temp"] == [0.04] * 4
    assert history["grad_norm"] == [5.0] * 4  # the norm of the per-parameter norms
    # images/s and data time cover the iterations since the previous logged one (none before the first)
    assert history["images_per_sec"][0] is None and all(v > 0 for v in history["images_per_sec"][1:])
    assert all(v >= 0 for v in history["data_time"][1:])
    # the same through the file path; a line cut short by a crash is skipped
    with open(out / tracking.HISTORY_FILE, "a") as f:
        f.write('{"iteration": 12, "lo')
    assert tracking.read_history(str(out / tracking.HISTORY_FILE), as_dataframe=False)["iteration"] == [0, 3, 6, 9]

    # resumed at iteration 6 (the checkpoint's): what was logged from there on is redone, once
    tracker = make_tracker(args, start_iteration=6, iters_per_epoch=5, images_per_batch=8)
    train(tracker, 12, first=6, loss_offset=100)
    history = tracking.read_history(str(out), as_dataframe=False)
    assert history["iteration"] == [0, 3, 6, 9]
    assert history["loss"] == [0.0, 3.0, 106.0, 109.0]

    # a new run in the same folder moves the old history aside, as log.txt
    tracker = make_tracker(args, start_iteration=0, iters_per_epoch=5, images_per_batch=8)
    train(tracker, 2)
    assert tracking.read_history(str(out), as_dataframe=False)["iteration"] == [0]
    assert (out / (tracking.HISTORY_FILE + ".old")).is_file()

    # a DataFrame when pandas is there; otherwise a clear message
    if importlib.util.find_spec("pandas") is not None:
        assert list(tracking.read_history(str(out))["iteration"]) == [0]
    else:
        assert isinstance(tracking.read_history(str(out)), dict)
    monkeypatch.setitem(sys.modules, "pandas", None)
    assert isinstance(tracking.read_history(str(out)), dict)
    with pytest.raises(utils.UserError, match="pip install pandas"):
        tracking.read_history(str(out), as_dataframe=True)
    with pytest.raises(utils.UserError, match="does not exist"):
        tracking.read_history(str(tmp_path / "nowhere"))


def test_tensorboard_curve_continues_without_duplicates_after_resume(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    out.mkdir()
    args = make_args(out, "--log_freq", 1, "--logger", "tensorboard")
    # the first process logged up to iteration 13, but its last checkpoint was taken at iteration 10
    train(make_tracker(args, start_iteration=0, iters_per_epoch=5, images_per_batch=8), 14)
    train(make_tracker(args, start_iteration=10, iters_per_epoch=5, images_per_batch=8), 20, first=10,
          loss_offset=100)
    log_dir = out / tracking.TENSORBOARD_DIR
    assert len(glob.glob(str(log_dir / "events.out.tfevents.*"))) == 2
    loss, tags = scalars(log_dir, "train/loss")
    assert [s for s, _ in loss] == list(range(20)), "one point per iteration, none twice"
    assert [v for _, v in loss] == [float(i) for i in range(10)] + [100.0 + i for i in range(10, 20)]
    epoch_loss, _ = scalars(log_dir, "epoch/train_loss")
    assert epoch_loss == [(4, 4.0), (9, 9.0), (14, 114.0), (19, 119.0)]  # at the epoch's last iteration
    assert {"train/lr", "train/grad_norm", "train/teacher_temp", "train/images_per_sec"} <= set(tags["scalars"])
    assert "epoch/epoch" not in tags["scalars"] and "epoch/note" not in tags["scalars"]
    assert "config/text_summary" in tags["tensors"]  # the flags, once


def test_wandb_offline_run_folder_and_the_same_run_after_resume(tmp_path, wandb_env, capsys):
    out = tmp_path / "run"
    out.mkdir()
    args = make_args(out, "--log_freq", 2, "--logger", "wandb", "--wandb_project", "tests",
                     "--wandb_tags", "a", "b")
    # no WANDB_MODE and W&B cannot start online (here: no API key, no server): offline, and the user is told
    # why and how to upload
    wandb_env.delenv("WANDB_MODE")
    wandb_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    state = train(make_tracker(args, start_iteration=0, iters_per_epoch=5, images_per_batch=8), 10)
    printed = capsys.readouterr().out
    assert re.search(r"W&B: could not start online \(.+\): logging offline\.", printed), printed
    run_id = state["wandb_run_id"]
    assert f"wandb sync {out / 'wandb' / ('offline-run-*-' + run_id)}" in printed
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    first = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))
    assert len(first) == 1
    run_file = os.path.join(first[0], f"run-{run_id}.wandb")
    # W&B's own writer process may still be flushing the file for a moment after finish() under load
    deadline = time.time() + 20
    while True:
        content = open(run_file, "rb").read()
        if b"epoch/train_loss" in content or time.time() > deadline:
            break
        time.sleep(0.5)
    assert b"train/loss" in content and b"epoch/train_loss" in content and b"wandb_project" in content

    # resumed (a requeued job): the id comes from the checkpoint's state
    wandb_env.setenv("WANDB_MODE", "offline")
    time.sleep(1.1)  # W&B names run folders by the second
    state2 = train(make_tracker(args, start_iteration=6, iters_per_epoch=5, images_per_batch=8,
                                    state=state), 12, first=6)
    assert state2 == state
    assert f"W&B: run {run_id} (resumed, offline)" in capsys.readouterr().out
    assert len(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))) == 2
    assert len(glob.glob(str(out / "wandb" / "offline-run-*"))) == 2, "no other run"

    # a resumed run that does not use W&B keeps the id for a later one that does
    args_none = make_args(out, "--log_freq", 2)
    assert train(make_tracker(args_none, start_iteration=12, iters_per_epoch=5, images_per_batch=8,
                                  state=state), 14, first=12) == state


def test_missing_logger_package_is_one_line(tmp_path, monkeypatch):
    for name, module in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(utils.UserError) as e:
            make_args(tmp_path, "--logger", name)
        assert str(e.value) == (f"--logger {name} needs the {module} package, which is not installed: "
                                f"pip install {module} (or leave {name} out of --logger)")
    with pytest.raises(utils.UserError, match="--log_freq must be at least 1"):
        make_args(tmp_path, "--log_freq", 0)
    # main_dino.py stops with it before anything is built (the command line makes one line of it: test_main_dino.py)
    import main_dino
    with pytest.raises(utils.UserError, match=r"^--logger wandb needs the wandb package, which is not installed: "
                                              r"pip install wandb \(or leave wandb out of --logger\)$"):
        main_dino.train_dino(parse(main_dino, "--data_path", "synthetic", "--logger", "wandb",
                                   "--output_dir", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Training scripts
# ----------------------------------------------------------------------------------------------------
# 40 CIFAR images, batch 8: 5 optimizer steps per epoch, 10 in the run.
FAST = with_flags(DINO_FAST, batch_size_per_gpu=8, epochs=2, log_freq=2)


def wandb_home(tmp_path):
    return {"WANDB_MODE": "offline", **{name: str(tmp_path / "wandb_home" / name.lower())
                                        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}}


def test_main_dino_interrupted_and_resumed_is_one_curve_and_one_wandb_run(cifar_40, tmp_path, wandb_env, capsys):
    pytest.importorskip("tensorboard")
    import main_dino
    out = tmp_path / "run"
    flags = ["--data_path", cifar_40, "--output_dir", out, *FAST, "--logger", "tensorboard", "wandb",
             "--wandb_run_name", "resumed-run"]
    # SIGTERM (what SLURM sends before a timeout) in the middle of the second epoch
    code, output = stop_when(main_dino_cmd(*flags), r"Epoch: \[1/2\]\s+\[1/5\]",
                             lambda p: os.killpg(p.pid, signal.SIGTERM), env=child_env(**wandb_home(tmp_path)))
    assert code == 128 + signal.SIGTERM, output[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and "position" in ckpt
    run_id = ckpt["tracking"]["wandb_run_id"]
    assert f"W&B: run {run_id} (new, offline)" in output

    # resumed (here in this process, with the same W&B folders: wandb_env)
    main_dino.train_dino(parse(main_dino, *flags))
    assert f"W&B: run {run_id} (resumed, offline)" in capsys.readouterr().out

    # the history: every other iteration, each once, with every quantity
    history = tracking.read_history(str(out), as_dataframe=False)
    assert history["iteration"] == [0, 2, 4, 6, 8]
    for key in ("loss", "lr", "wd", "teacher_momentum", "teacher_temp", "grad_norm"):
        assert all(isinstance(v, float) for v in history[key]), key
    # throughput since the previous logged iteration of the same process (none for the first of each)
    for key in ("images_per_sec", "data_time"):
        assert history[key][0] is None and sum(isinstance(v, float) for v in history[key]) >= 3, history[key]
    # TensorBoard: one continuous curve against the training iteration, the epochs at their last iteration
    loss, tags = scalars(out / tracking.TENSORBOARD_DIR, "train/loss")
    assert [s for s, _ in loss] == [0, 2, 4, 6, 8]
    assert [v for _, v in loss] == pytest.approx(history["loss"])
    epoch_loss, _ = scalars(out / tracking.TENSORBOARD_DIR, "epoch/train_loss")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert epoch_loss == [(4, pytest.approx(log[0]["train_loss"])), (9, pytest.approx(log[1]["train_loss"]))]
    # W&B: both parts of the run carry the same id, the one kept in the final checkpoint
    parts = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(parts) == 2 and all(p.endswith(f"-{run_id}") for p in parts)
    final = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert final["tracking"] == {"wandb_run_id": run_id}


def test_main_distill_logs_every_loss_term_per_iteration(distill_run):
    _, out, _ = distill_run  # 2 epochs of 2 iterations, --log_freq 1
    history = tracking.read_history(str(out), as_dataframe=False)
    assert history["iteration"] == [0, 1, 2, 3]
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "cls_loss", "spd_loss", "teacher_temp", "lr",
                "wd", "grad_norm"):
        assert all(isinstance(v, float) for v in history[key]), key


def test_eval_linear_logs_every_head_per_iteration(tmp_path):
    pytest.importorskip("tensorboard")
    import eval_linear
    image_folder(tmp_path / "data" / "train", n_per_class=8, size=32)
    image_folder(tmp_path / "data" / "val", n_per_class=2, size=32, seed=1)
    out = tmp_path / "linear"
    eval_linear.eval_linear(parse(
        eval_linear, "--data_path", tmp_path / "data", "--output_dir", out, "--arch", "vit_tiny", "--patch_size", 16,
        "--resize_size", 32, "--crop_size", 32, "--batch_size_per_gpu", 4, "--num_workers", 0, "--epochs", 2,
        "--lrs", 0.01, 0.1, "--cache_features", "--log_freq", 1, "--logger", "tensorboard"))
    history = tracking.read_history(str(out), as_dataframe=False)
    assert history["iteration"] == list(range(8))  # 16 images, batch 4, 2 epochs
    assert history["lr/lr0.1"][0] == pytest.approx(0.1 * 4 / 256)
    assert all(isinstance(v, float) for v in history["loss/lr0.01"] + history["loss/lr0.1"])
    accuracy, tags = scalars(out / tracking.TENSORBOARD_DIR, "epoch/test_acc1")
    assert [s for s, _ in accuracy] == [3, 7]
    assert "train/loss/lr0.01" in tags["scalars"]


def test_run_clock_estimates_the_whole_run_after_a_few_steps_and_after_the_first_epoch(monkeypatch, capsys):
    """Every run says how long it will take on this machine: steps left x the measured step time (the first,
    slower steps left out), then epochs left x (training + evaluation) of its first epoch."""
    now = [1000.0]
    monkeypatch.setattr(tracking.time, "time", lambda: now[0])
    clock = tracking.RunClock(iters_per_epoch=10, epochs=4, warmup=2, measure=5)
    for it in range(8):
        now[0] += 100.0 if it < 2 else 2.0  # two slow first steps, then 2 s each
        clock.step_done(it)
    out = capsys.readouterr().out
    assert out.count("Estimated time") == 1
    # after the 7th step (iteration 6): steps 3-7 timed, 33 iterations left at 2 s
    assert ("Estimated time of this run on this machine: 1 min 06 s of training for the 33 iterations left (2 s "
            "each over iterations 3-7)") in out
    clock.epoch_done(0, {"epoch_time": 30.0}, {"knn_time": 6.0})
    clock.epoch_done(1, {"epoch_time": 30.0}, {})
    out = capsys.readouterr().out
    assert "Estimated time left on this machine: 1 min 48 s for 3 more epoch(s) of 30 s training + 6 s evaluation" in out
    assert out.count("Estimated") == 1
    assert tracking.duration(3725) == "1 h 02 min" and tracking.duration(59.6) == "1 min 00 s"
