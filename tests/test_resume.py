"""Mid-epoch exact resume: a run stopped by a signal (or killed after a periodic mid-epoch checkpoint) and
started again ends with the same weights and the same log as a run never stopped."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (REPO_ROOT, assert_same_log, child_env, load_checkpoint, read_log, run_cmd, script,
                      stop_when)

# 160 CIFAR images, batch 16: 10 optimizer steps per epoch in one process, 5 per process with two.
FAST = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--out_dim", "256", "--batch_size_per_gpu", "16", "--warmup_epochs", "1",
        "--print_freq", "1", "--saveckp_freq", "0", "--epochs", "2", "--num_workers", "2"]
TIMING_KEYS = {"train_images_per_sec", "train_epoch_time"}


def assert_same_run(ref, resumed):
    """Same log (but timings) and bit-identical teacher, student, optimizer state and centre."""
    assert_same_log(ref, resumed, TIMING_KEYS)
    a, b = load_checkpoint(ref / "checkpoint.pth"), load_checkpoint(resumed / "checkpoint.pth")
    for key in ("teacher", "student"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert "position" not in b, "a finished run's checkpoint is an epoch checkpoint"


def main_dino(*args):
    return script("main_dino.py", *args)


# SIGINT and SIGUSR2 take the same path as SIGTERM (SIGUSR2 is also covered by the torchrun and SLURM tests)
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    pytest.param(signal.SIGUSR2, marks=pytest.mark.slow)])
def test_signal_mid_epoch_then_resume_equals_uninterrupted(cifar_subset, tmp_path, signum):
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", ref, *FAST))

    # The signal reaches every process of the group (data-loader workers included), as SLURM sends it.
    code, out = stop_when(main_dino("--data_path", cifar_subset, "--output_dir", stopped, *FAST),
                          r"Epoch: \[1/2\]\s+\[ 3/10\]", lambda p: os.killpg(p.pid, signum))
    assert code == 128 + signum, out[-3000:]
    assert f"Received {signal.Signals(signum).name}" in out
    assert re.search(rf"Stopped by {signal.Signals(signum).name} at epoch 1, iteration [4-9]/10", out), out[-2000:]
    assert "Traceback" not in out
    ckpt = load_checkpoint(stopped / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and 4 <= ckpt["position"]["batches"] <= 9
    assert len(read_log(stopped)) == 1, "the unfinished epoch is not logged"

    proc = run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", stopped, *FAST))
    assert f"Resuming epoch 1 at batch {ckpt['position']['batches']} of 10" in proc.stdout
    # The consumed batches are not read again: the first line printed is the next iteration.
    assert re.search(rf"Epoch: \[1/2\]\s+\[ ?{ckpt['position']['batches']}/10\]", proc.stdout)
    assert "[ 0/10]" not in proc.stdout.split("Resuming epoch")[1]
    assert_same_run(ref, stopped)


def test_kill9_after_periodic_mid_epoch_checkpoint(cifar_subset, tmp_path):
    """--saveckp_every_iters: a crash without any signal loses at most that many iterations."""
    flags = [*FAST, "--saveckp_every_iters", 3]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", ref, *flags))

    def killed_after_checkpoint(p):
        os.killpg(p.pid, signal.SIGKILL)
    # Every 3 iterations of the run: after global iterations 2, 5, 8, 11 and 14, i.e. epoch 1's batch 5 has
    # been checkpointed when the progress line of its iteration 4 (printed after the step) appears.
    code, _ = stop_when(main_dino("--data_path", cifar_subset, "--output_dir", killed, *flags),
                        r"Epoch: \[1/2\]\s+\[ 4/10\]", killed_after_checkpoint)
    assert code == -signal.SIGKILL
    ckpt = load_checkpoint(killed / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and ckpt["position"]["batches"] == 5
    run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", killed, *flags))
    assert_same_run(ref, killed)


def test_torchrun_one_rank_signalled_both_stop_at_the_same_step(cifar_subset, tmp_path):
    """Only rank 1 receives SIGUSR2: both ranks agree, stop after the same step, and the 2-process resume
    equals the uninterrupted 2-process run."""
    def torchrun(out):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO_ROOT / "main_dino.py"), "--data_path", str(cifar_subset), "--output_dir", str(out),
                *map(str, FAST)]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    run_cmd(torchrun(ref))

    def signal_rank1(p):
        # the rank's main process: a child of torchrun with RANK=1 in its environment
        for pid in map(int, subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()):
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"\0RANK=1\0" in b"\0" + f.read():
                    os.kill(pid, signal.SIGUSR2)
                    return
        raise AssertionError("rank 1 not found")
    code, out = stop_when(torchrun(stopped), r"Epoch: \[0/2\]\s+\[1/5\]", signal_rank1)
    assert "Received SIGUSR2" in out
    assert re.search(r"Stopped by SIGUSR2 at epoch 0, iteration [2-4]/5", out), out[-3000:]
    assert code != 0
    ckpt = load_checkpoint(stopped / "checkpoint.pth")
    assert len(ckpt["position"]["ranks"]) == 2 and len(ckpt["rng_states"]) == 2
    run_cmd(torchrun(stopped))
    assert_same_run(ref, stopped)


def test_resume_with_another_number_of_processes_is_refused(cifar_subset, tmp_path):
    out = tmp_path / "run"
    stop_when(main_dino("--data_path", cifar_subset, "--output_dir", out, *FAST), r"Epoch: \[0/2\]\s+\[ 2/10\]",
              lambda p: os.killpg(p.pid, signal.SIGTERM))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO_ROOT / "main_dino.py"), "--data_path", str(cifar_subset), "--output_dir",
                           str(out), *map(str, FAST)], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "resume it with the same number of processes (this run has 2) and the same flags" in proc.stderr
