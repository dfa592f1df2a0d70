"""run_with_submitit.py on the real single-node SLURM of `slurm_cluster`: a 2-task CPU main_dino.py job, a job
preempted mid-epoch with USR2 that requeues, resumes and ends with the weights of the uninterrupted job, and
an eval_knn.py job."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DINO_FAST, read_log, split_folder, with_flags
from slurm_helpers import job_status, scancel, wait_for_job

REPO_ROOT = Path(__file__).resolve().parents[2]

FLAGS = with_flags(DINO_FAST, epochs=3, num_workers=1)  # 40 images: 5 steps per task and epoch
SLURM = ["--ngpus", "0", "--nodes", "1", "--tasks_per_node", "2", "--cpus_per_task", "1", "--partition", "debug",
         "--timeout", "20", "--mem_gb", "8"]


def submit(*args):
    """Run run_with_submitit.py as a user would; returns (job id, its stdout)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_with_submitit.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd="/",  # from anywhere
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"Submitted job_id: (\d+)", proc.stdout).group(1)
    return job_id, proc.stdout


def task_logs(job_dir, job_id):
    return "".join((job_dir / f"{job_id}_{t}_log.{ext}").read_text() for t in (0, 1) for ext in ("out", "err")
                   if (job_dir / f"{job_id}_{t}_log.{ext}").exists())


def finished(job_id, job_dir, timeout=600):
    status = wait_for_job(job_id, timeout=timeout)
    assert status.state == "COMPLETED", f"{status}\n{task_logs(job_dir, job_id)[-4000:]}"
    return status


@pytest.fixture(scope="module")
def reference_job(slurm_cluster, cifar_40, tmp_path_factory):
    """The README's 2-task CPU submission, uninterrupted."""
    job_dir = tmp_path_factory.mktemp("slurm_ref")
    job_id, out = submit(*SLURM, "--job_dir", job_dir, "--data_path", cifar_40, *FLAGS)
    assert f"Logs and checkpoints will be saved at: {job_dir}" in out
    assert f"tail -f {job_dir}/{job_id}_0_log.out" in out
    finished(job_id, job_dir)
    return job_id, job_dir


def test_two_task_cpu_job_trains_like_a_local_run(reference_job):
    job_id, job_dir = reference_job
    logs = task_logs(job_dir, job_id)
    assert "distributed init (rank 0/2, gloo)" in logs and "Process group: 2 tasks, rank: 1" in logs
    assert "5 optimizer steps per epoch" in logs  # 40 images, 4 per task and step, 2 tasks
    assert [r["epoch"] for r in read_log(job_dir)] == [0, 1, 2]
    ckpt = torch.load(job_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["args"]["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert (job_dir / "training_curves.png").is_file()


def test_usr2_mid_epoch_requeues_and_ends_with_the_uninterrupted_weights(reference_job, cifar_40, tmp_path):
    ref_id, ref_dir = reference_job
    job_dir = tmp_path / "job"
    job_id, _ = submit(*SLURM, "--job_dir", job_dir, "--data_path", cifar_40, *FLAGS)
    log0 = job_dir / f"{job_id}_0_log.out"
    deadline = time.time() + 600
    # signal early in epoch 1: a signal that lands in the epoch's last step stops after the epoch instead
    # (engine.Run.end_epoch), and this test is about the mid-epoch stop (it once waited out its 300 s so)
    while not (log0.exists() and re.search(r"Epoch: \[1/3\]\s+\[1/5\]", log0.read_text())):
        assert time.time() < deadline and job_status(job_id).state in ("PENDING", "RUNNING", "CONFIGURING"), \
            task_logs(job_dir, job_id)[-3000:]
        time.sleep(0.2)
    signalled = time.time()
    scancel(job_id, "--signal=USR2")  # what a preempting scheduler, or the time limit, sends

    # the requeued job resumes at the next iteration of epoch 1
    while "Resuming epoch" not in log0.read_text():
        assert time.time() < signalled + 300, task_logs(job_dir, job_id)[-3000:]
        time.sleep(0.2)
    resumed = time.time()
    status = finished(job_id, job_dir)
    logs = log0.read_text()
    stopped_at = re.search(r"Stopped by SIGUSR2 at epoch 1, iteration (\d)/5", logs)
    assert stopped_at, logs[-3000:]
    assert f"Resuming epoch 1 at batch {stopped_at.group(1)} of 5" in logs, "no iteration lost or repeated"
    assert "Requeuing main_dino.py" in logs
    assert int(status.restarts) == 1
    print(f"\nrequeue: {resumed - signalled:.1f} s from USR2 to the resumed iteration; stopped after iteration "
          f"{stopped_at.group(1)} of epoch 1, resumed at batch {stopped_at.group(1)}: 0 iterations lost")

    assert [r["epoch"] for r in read_log(job_dir)] == [0, 1, 2], "every epoch logged exactly once"
    drop = {"train_images_per_sec", "train_epoch_time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_log(ref_dir)] == \
           [{k: v for k, v in r.items() if k not in drop} for r in read_log(job_dir)]
    a = torch.load(ref_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(job_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
    for key in ("teacher", "student"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs from the uninterrupted job"


def test_eval_knn_job(reference_job, cifar_40, tmp_path):
    _, ref_dir = reference_job
    split = split_folder(cifar_40, tmp_path / "split")
    job_dir = tmp_path / "knn"
    job_id, _ = submit("--script", "eval_knn.py", *SLURM, "--job_dir", job_dir, "--arch", "vit_tiny",
                       "--patch_size", "8", "--pretrained_weights", ref_dir / "checkpoint.pth", "--checkpoint_key",
                       "teacher", "--data_path", split, "--resize_size", "32", "--crop_size", "32",
                       "--batch_size_per_gpu", "32", "--num_workers", "1", "--nb_knn", "10", "20")
    finished(job_id, job_dir, timeout=300)
    logs = task_logs(job_dir, job_id)
    # train = val here, so the nearest neighbour of each image is itself: the accuracy is high
    top1 = [float(x) for x in re.findall(r"20-NN classifier result: Top1: ([\d.]+)", logs)]
    assert top1 and top1[0] > 50, logs[-3000:]


def test_typo_fails_before_submission(slurm_cluster, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_with_submitit.py"), *SLURM, "--job_dir",
                           tmp_path, "--data_path", "synthetic", "--epocs", "3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized arguments: --epocs 3" in proc.stderr
    assert not list(tmp_path.glob("*_submission.sh")), "nothing was submitted"
