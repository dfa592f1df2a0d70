"""Mid-epoch exact resume: a run stopped by a signal (or killed after a periodic mid-epoch checkpoint) and
started again ends with the same weights and the same log as a run never stopped (conftest.py's
`dino_reference`, or `torchrun_reference` for two processes)."""
import os
import re
import shutil
import signal

import pytest
import torch

import main_dino
import utils
from conftest import (assert_same_dino_run, load_checkpoint, main_dino as main_dino_cmd, parse, pid_of_rank, read_log,
                      reference_flags, run_cmd, stop_when, torchrun)


def flags(data_path, out, *extra):
    """The reference's flags, with 2 data-loader workers (a signal to the group reaches them too)."""
    return reference_flags(data_path, out, "--num_workers", 2, *extra)


def train(data_path, out, *extra):
    """The run started again, in this process (without data-loader workers: the numbers do not depend on them).
    The same command again in a new process: the torchrun test below, test_faults.py and the SLURM tests."""
    main_dino.train_dino(parse(main_dino, *reference_flags(data_path, out, *extra)))


# SIGINT and SIGUSR2 take the same path as SIGTERM (SIGUSR2 is also covered by the torchrun and SLURM tests)
@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    pytest.param(signal.SIGUSR2, marks=pytest.mark.slow)])
def test_signal_mid_epoch_then_resume_equals_uninterrupted(cifar_40, dino_reference, tmp_path, capsys, signum):
    stopped = tmp_path / "stopped"
    # The signal reaches every process of the group (data-loader workers included), as SLURM sends it.
    code, out = stop_when(main_dino_cmd(*flags(cifar_40, stopped)), r"Epoch: \[1/2\]\s+\[ 3/10\]",
                          lambda p: os.killpg(p.pid, signum))
    assert code == 128 + signum, out[-3000:]
    assert f"Received {signal.Signals(signum).name}" in out
    assert re.search(rf"Stopped by {signal.Signals(signum).name} at epoch 1, iteration [4-9]/10", out), out[-2000:]
    assert "Traceback" not in out
    ckpt = load_checkpoint(stopped / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and 4 <= ckpt["position"]["batches"] <= 9
    assert len(read_log(stopped)) == 1, "the unfinished epoch is not logged"

    capsys.readouterr()
    train(cifar_40, stopped)
    stdout = capsys.readouterr().out
    assert f"Resuming epoch 1 at batch {ckpt['position']['batches']} of 10" in stdout
    # The consumed batches are not read again: the first line printed is the next iteration.
    assert re.search(rf"Epoch: \[1/2\]\s+\[ ?{ckpt['position']['batches']}/10\]", stdout)
    assert not re.search(r"Epoch: \[1/2\]\s+\[ 0/10\]", stdout.split("Resuming epoch")[1])
    assert_same_dino_run(dino_reference[0], stopped)


@pytest.fixture(scope="module")
def killed_after_periodic_checkpoint(cifar_40, tmp_path_factory):
    """A run with --saveckp_every_iters 3, killed (-9) once its checkpoint of epoch 1, batch 5 is written."""
    killed = tmp_path_factory.mktemp("periodic") / "killed"
    # Every 3 iterations of the run: after global iterations 2, 5, 8, 11 and 14, i.e. epoch 1's batch 5 has
    # been checkpointed when the progress line of its iteration 4 (printed after the step) appears.
    code, _ = stop_when(main_dino_cmd(*flags(cifar_40, killed, "--saveckp_every_iters", 3)),
                        r"Epoch: \[1/2\]\s+\[ 4/10\]", lambda p: os.killpg(p.pid, signal.SIGKILL))
    assert code == -signal.SIGKILL
    return killed


def test_kill9_after_periodic_mid_epoch_checkpoint(cifar_40, dino_reference, killed_after_periodic_checkpoint,
                                                   tmp_path):
    """--saveckp_every_iters: a crash without any signal loses at most that many iterations."""
    killed = shutil.copytree(killed_after_periodic_checkpoint, tmp_path / "killed")
    ckpt = load_checkpoint(killed / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and ckpt["position"]["batches"] == 5
    train(cifar_40, killed, "--saveckp_every_iters", 3)
    assert_same_dino_run(dino_reference[0], killed)


def test_resume_with_another_number_of_processes_is_refused(cifar_40, killed_after_periodic_checkpoint, tmp_path):
    """A position inside an epoch counts each process's batches: it means the same samples only with the same
    processes. (The checkpoint of one process, as if written by two, resumed by one.)"""
    other = shutil.copytree(killed_after_periodic_checkpoint, tmp_path / "other")
    ckpt = load_checkpoint(other / "checkpoint.pth")
    ckpt["position"]["ranks"] *= 2
    torch.save(ckpt, other / "checkpoint.pth")
    with pytest.raises(utils.UserError, match=r"in the middle of epoch 1 by 2 processes .* resume it with the same "
                                              r"number of processes \(this run has 1\) and the same flags"):
        train(cifar_40, other)


def test_torchrun_one_rank_signalled_both_stop_at_the_same_step(cifar_40, torchrun_reference, tmp_path):
    """Only rank 1 receives SIGUSR2: both ranks agree, stop after the same step, and the 2-process resume
    equals the uninterrupted 2-process run."""
    stopped = tmp_path / "stopped"
    cmd = torchrun("main_dino.py", *reference_flags(cifar_40, stopped, "--num_workers", 1))
    code, out = stop_when(cmd, r"Epoch: \[0/2\]\s+\[1/5\]", lambda p: os.kill(pid_of_rank(p.pid, 1), signal.SIGUSR2))
    assert "Received SIGUSR2" in out
    assert re.search(r"Stopped by SIGUSR2 at epoch 0, iteration [2-4]/5", out), out[-3000:]
    assert code != 0
    ckpt = load_checkpoint(stopped / "checkpoint.pth")
    assert len(ckpt["position"]["ranks"]) == 2 and len(ckpt["rng_states"]) == 2
    run_cmd(cmd)
    assert_same_dino_run(torchrun_reference[0], stopped)


def test_periodic_checkpoint_is_a_link_that_later_writes_leave_alone(tmp_path):
    """checkpointNNNN.pth is a hard link to the checkpoint just written (no second serialisation); the next atomic
    write of checkpoint.pth replaces that name only, so the periodic file keeps its epoch's bytes."""
    import checkpointing
    import engine
    latest, periodic = tmp_path / "checkpoint.pth", tmp_path / "checkpoint0000.pth"
    checkpointing.atomic_save({"epoch": 1, "w": torch.ones(3)}, str(latest))
    assert engine.link_copy(str(latest), str(periodic))
    assert os.path.samefile(latest, periodic)
    checkpointing.atomic_save({"epoch": 2, "w": torch.zeros(3)}, str(latest))
    assert torch.load(periodic, weights_only=True)["epoch"] == 1
    assert torch.load(latest, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint0000.pth"]
    assert not engine.link_copy(str(tmp_path / "missing.pth"), str(tmp_path / "x.pth"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint0000.pth"]
