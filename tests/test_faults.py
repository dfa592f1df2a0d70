"""Fault injection, for real: kill -9 at random moments, a full disk, a killed rank, ranks that disagree, bad
images of every kind, a pickle payload given to every script that reads weights, non-finite steps."""
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO_ROOT, child_env, load_checkpoint, noise_image, read_log, run_cmd, script

FAST = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--out_dim", "256", "--batch_size_per_gpu", "16", "--warmup_epochs", "1",
        "--print_freq", "1", "--saveckp_freq", "0"]


# ----------------------------------------------------------------------------------------------------
# kill -9
# ----------------------------------------------------------------------------------------------------
def test_repeated_kill9_at_random_moments(cifar_subset, tmp_path):
    """kill -9 five times at random moments (one of them while a checkpoint is being written): every
    checkpoint left behind loads, and the run, started again each time, ends with every epoch logged once
    and the same weights as a run never killed."""
    common = ["--data_path", cifar_subset, "--epochs", 4, "--num_workers", 1, "--saveckp_every_iters", 4, *FAST]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    start = time.time()
    run_cmd(script("main_dino.py", *common, "--output_dir", ref))
    full_run = time.time() - start

    rng = random.Random(0)
    kills = 0
    for attempt in range(5):
        proc = subprocess.Popen(script("main_dino.py", *common, "--output_dir", killed), env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if attempt == 1:  # at the moment a checkpoint write starts
                while proc.poll() is None and not any(p.name.startswith(".checkpoint.pth.tmp")
                                                      for p in killed.glob(".*")):
                    time.sleep(0.002)
            else:
                proc.wait(timeout=rng.uniform(0.15, 0.45) * full_run)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        if (killed / "checkpoint.pth").exists():
            load_checkpoint(killed / "checkpoint.pth")  # never unloadable
        if (killed / "log.txt").exists():
            epochs = [r["epoch"] for r in read_log(killed)]
            assert epochs == sorted(set(epochs)), f"duplicate or unordered epochs in log.txt: {epochs}"
        if proc.returncode == 0:
            break
    assert kills >= 3, "the runs ended before they could be killed: make them longer"

    run_cmd(script("main_dino.py", *common, "--output_dir", killed))
    assert [r["epoch"] for r in read_log(killed)] == [0, 1, 2, 3], "every epoch logged exactly once"
    a, b = load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(killed / "checkpoint.pth")
    for name in a["teacher"]:
        assert torch.equal(a["teacher"][name], b["teacher"][name]), f"teacher.{name} differs"
    drop = {"train_images_per_sec", "train_epoch_time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_log(ref)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in read_log(killed)]
    assert not list(killed.glob(".checkpoint.pth.tmp*")), "temporary files of killed writes are cleaned up"


# ----------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------
def test_full_disk_keeps_previous_checkpoint_and_says_so(cifar_subset, tmp_path):
    out = tmp_path / "run"
    common = ["--data_path", cifar_subset, "--output_dir", out, "--num_workers", 0, *FAST]
    run_cmd(script("main_dino.py", *common, "--epochs", 1))
    good = (out / "checkpoint.pth").read_bytes()

    def small_file_limit():  # files larger than half a checkpoint cannot be written (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, len(good) // 2))
    proc = subprocess.run(script("main_dino.py", *common, "--epochs", 2), env=child_env(), capture_output=True,
                          text=True, preexec_fn=small_file_limit, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "could not write checkpoint" in proc.stderr and "The previous checkpoint, if any, is intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == good
    assert not list(out.glob(".checkpoint.pth.tmp*"))
    # With space again, the same command finishes the run.
    run_cmd(script("main_dino.py", *common, "--epochs", 2))
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


# ----------------------------------------------------------------------------------------------------
# Distributed faults
# ----------------------------------------------------------------------------------------------------
def test_killed_rank_does_not_hang_the_other(cifar_subset, tmp_path):
    """2 gloo processes under torchrun; rank 1 is killed: the other does not wait for it until a timeout,
    and the failure names the rank."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO_ROOT / "main_dino.py"), "--data_path", str(cifar_subset), "--output_dir", str(out),
           "--epochs", "5", "--num_workers", "0", "--dist_timeout", "2", *FAST]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Epoch: [0/5]  [1/5]" in line:
                break
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [int(p) for p in children
                 if b"\0RANK=1\0" in b"\0" + open(f"/proc/{p}/environ", "rb").read()]
        assert rank1, "rank 1 not found"
        killed_at = time.time()
        os.kill(rank1[0], signal.SIGKILL)
        lines += proc.stdout.readlines()
        proc.wait(timeout=150)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert proc.returncode != 0
    assert elapsed < 150, f"the surviving rank waited {elapsed:.0f} s"
    assert "local_rank: 1" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]


def test_ranks_with_different_flags_stop_at_startup(cifar_subset, tmp_path):
    """Two processes started by hand (as on two nodes) with different --lr: both stop with one message."""
    port = str(29500 + random.Random().randrange(1000))
    procs = []
    for rank, lr in ((0, "0.0005"), (1, "0.001")):
        procs.append(subprocess.Popen(
            script("main_dino.py", "--data_path", cifar_subset, "--output_dir", tmp_path / "run", "--epochs", 1,
                   "--num_workers", 0, "--lr", lr, *FAST),
            env=child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 2, err[-2000:]
        assert "the processes disagree on their flags (lr: rank 0='0.0005', rank 1='0.001')" in err
        assert "Traceback" not in err
    assert "Starting DINO training" not in results[0][0]


# ----------------------------------------------------------------------------------------------------
# Bad images
# ----------------------------------------------------------------------------------------------------
def _bad_images_dataset(src, dst):
    """A copy of `src` plus files of every odd kind; returns the paths that cannot be read."""
    import shutil
    import numpy as np
    from PIL import Image
    shutil.copytree(src, dst)
    cls = sorted(p for p in dst.iterdir() if p.is_dir())
    good = next(cls[0].iterdir()).read_bytes()
    unreadable = {
        "truncated.jpg": good[: len(good) // 3],
        "empty.jpg": b"",
        "not_an_image.jpg": b"this is not an image\n" * 20,
        "unsupported.png": b"%PDF-1.4\n" + os.urandom(200),  # another format under an image extension
    }
    for i, (name, payload) in enumerate(unreadable.items()):
        (cls[i] / name).write_bytes(payload)
    img = noise_image((40, 36))
    img.convert("L").save(cls[4] / "grayscale.png")
    img.convert("P").save(cls[5] / "palette.png")
    img.convert("RGBA").save(cls[6] / "rgba.png")
    img.convert("CMYK").save(cls[7] / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 36, dtype=np.uint16).reshape(36, 40) * 40)).save(cls[8] / "sixteen_bit.png")
    img.resize((8, 6)).save(cls[9] / "smaller_than_the_crop.png")
    return [cls[i] / name for i, name in enumerate(unreadable)]


def test_bad_images_of_every_kind_training_completes_and_names_them(cifar_subset, tmp_path):
    unreadable = _bad_images_dataset(cifar_subset, tmp_path / "data")
    out = tmp_path / "run"
    # 170 images, batch 17: every image is drawn in the epoch (no drop_last loss)
    flags = [("17" if prev == "--batch_size_per_gpu" else f) for prev, f in zip([None] + FAST, FAST)]
    proc = run_cmd(script("main_dino.py", "--data_path", tmp_path / "data", "--output_dir", out, "--epochs", 1,
                          "--num_workers", 2, "--max_bad_images_fraction", 0.05, *flags))
    for path in unreadable:
        assert proc.stdout.count(f"skipped unreadable image {path}") == 1, (path, proc.stdout[-3000:])
    assert proc.stdout.count("skipped unreadable image") == len(unreadable)
    assert read_log(out)[0]["train_bad_images"] == len(unreadable)


# ----------------------------------------------------------------------------------------------------
# A pickle payload, given to every script that reads weights
# ----------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def _malicious_checkpoint(path, marker):
    import vision_transformer as vits
    weights = vits.vit_tiny(patch_size=8).state_dict()
    torch.save({"student": {f"module.backbone.{k}": v for k, v in weights.items()},
                "teacher": {f"backbone.{k}": v for k, v in weights.items()}, "epoch": 1,
                "payload": _Payload(str(marker))}, str(path))


@pytest.mark.parametrize("where", ["main_dino_resume", "main_distill_teacher", "eval_knn", "eval_linear",
                                   "visualize_attention"])
def test_pickle_payload_refused_everywhere(cifar_subset, tmp_path, where):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    _malicious_checkpoint(evil, marker)
    vit = ["--arch", "vit_tiny", "--patch_size", 8]
    split = tmp_path / "split"  # the train/ + val/ layout of the evaluations
    split.mkdir()
    for name in ("train", "val"):
        (split / name).symlink_to(cifar_subset, target_is_directory=True)
    if where == "main_dino_resume":
        (tmp_path / "run").mkdir()
        evil.rename(tmp_path / "run" / "checkpoint.pth")
        cmd = script("main_dino.py", "--data_path", cifar_subset, "--output_dir", tmp_path / "run", "--epochs", 1,
                     "--num_workers", 0, *FAST)
    elif where == "main_distill_teacher":
        cmd = script("main_distill.py", "--data_path", cifar_subset, "--output_dir", tmp_path / "run", "--epochs",
                     1, "--num_workers", 0, "--teacher_arch", "vit_tiny", "--teacher_patch_size", 8,
                     "--teacher_weights", evil, *FAST)
    elif where == "eval_knn":
        cmd = script("eval_knn.py", *vit, "--pretrained_weights", evil, "--data_path", split,
                     "--num_workers", 0)
    elif where == "eval_linear":
        cmd = script("eval_linear.py", *vit, "--pretrained_weights", evil, "--data_path", split,
                     "--output_dir", tmp_path / "lin", "--num_workers", 0, "--epochs", 1)
    else:
        cmd = script("visualize_attention.py", *vit, "--pretrained_weights", evil, "--output_dir",
                     tmp_path / "att")
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "refusing to load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists(), "the payload ran"


# ----------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------
NAN_DRIVER = textwrap.dedent("""
    # main_dino.py whose DINO loss is NaN at the iterations listed in NAN_AT (a fault injected from outside)
    import os, sys, argparse
    import torch
    import main_dino, utils
    from losses.dino import DINOLoss
    nan_at = {int(i) for i in os.environ["NAN_AT"].split(",")}
    calls = {"n": 0}
    forward = DINOLoss.forward
    def faulty(self, *a, **k):
        loss = forward(self, *a, **k)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in nan_at else loss
    DINOLoss.forward = faulty
    parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
    utils.run_script(main_dino.train_dino, parser.parse_args(sys.argv[1:]))
""")


def _nan_run(cifar_subset, tmp_path, nan_at, *flags):
    driver = tmp_path / "nan_driver.py"
    driver.write_text(NAN_DRIVER)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(driver), "--data_path", str(cifar_subset), "--output_dir", str(out),
                           "--epochs", "2", "--num_workers", "0", *map(str, FAST), *map(str, flags)],
                          env=child_env(NAN_AT=nan_at), capture_output=True, text=True, timeout=600)
    return out, proc


def test_nonfinite_steps_skipped_up_to_the_limit(cifar_subset, tmp_path):
    out, proc = _nan_run(cifar_subset, tmp_path, "3,14", "--skip_nonfinite", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss or gradients at epoch 0, iteration 3: step skipped (1 of at most 2)" in proc.stdout
    assert "iteration 14: step skipped (2 of at most 2)" in proc.stdout
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert all(r["train_loss"] == r["train_loss"] for r in read_log(out)), "NaN reached the log"


def test_nonfinite_step_beyond_the_limit_stops_and_keeps_checkpoint(cifar_subset, tmp_path):
    out, proc = _nan_run(cifar_subset, tmp_path, "2,12,13", "--skip_nonfinite", 1)
    assert proc.returncode == 2
    assert "after 1 skipped step(s) (--skip_nonfinite): stopping training" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1  # the good epoch-0 checkpoint, not a broken state


def test_nonfinite_without_skipping_stops_at_once(cifar_subset, tmp_path):
    out, proc = _nan_run(cifar_subset, tmp_path, "2")
    assert proc.returncode == 2
    assert "Loss is nan at epoch 0, iteration 2" in proc.stderr and "--skip_nonfinite" in proc.stderr
    assert not (out / "checkpoint.pth").exists()
