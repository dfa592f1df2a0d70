"""Smoke tests of the single-node SLURM cluster: multi-task jobs, signals, requeue, submitit.

Each test submits real jobs with sbatch and follows them with `scontrol show job` (there is no sacct here).
"""
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import (SlurmError, job_status, parse_scontrol_line, sbatch, scancel, slurm_available,
                           submitit_results, wait_for_job, wait_for_state)


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body.lstrip())
    return path


def wait_for_files(paths, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise TimeoutError(f"files not written after {timeout:.0f}s: {missing}")
        time.sleep(0.1)


def test_parse_scontrol_line():
    line = ("JobId=12 JobName=my job UserId=root(0) JobState=COMPLETED Reason=None Restarts=1 ExitCode=0:0 "
            "AllocNode:Sid=localhost:300 CPUs/Task=1 TRES=cpu=2,mem=2G,node=1 Power=")
    info = parse_scontrol_line(line)
    assert info["JobId"] == "12" and info["JobName"] == "my job" and info["JobState"] == "COMPLETED"
    assert info["Restarts"] == "1" and info["AllocNode:Sid"] == "localhost:300" and info["CPUs/Task"] == "1"
    assert info["TRES"] == "cpu=2,mem=2G,node=1" and info["Power"] == ""


def test_slurm_available_reasons(monkeypatch):
    monkeypatch.setenv("DINO_SKIP_SLURM", "1")
    assert slurm_available() == (False, "DINO_SKIP_SLURM=1")
    monkeypatch.delenv("DINO_SKIP_SLURM")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    ok, reason = slurm_available()
    assert not ok and "root" in reason


def test_two_tasks(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "two.sh", """
#SBATCH --ntasks 2 --cpus-per-task 1 --output two-%j.out
srun bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"'
""")
    job = sbatch(script, cwd=tmp_path)
    status = wait_for_job(job, timeout=60)
    out = (tmp_path / f"two-{job}.out").read_text()
    assert status.state == "COMPLETED" and status.exit_code == "0:0", out
    assert sorted(out.split("\n")[:2]) == [f"task {r} of 2 on {slurm_cluster.node}" for r in (0, 1)], out


# Which `scancel --signal=USR2` form reaches what, measured on slurm 22.05 (batch script: `srun ... &; wait`):
#   scancel --signal=USR2 JOBID          -> every task of every srun step, NOT the batch shell
#   scancel --signal=USR2 --batch JOBID  -> the batch shell only
#   scancel --signal=USR2 --full JOBID   -> the batch shell and every srun task (each once)
# Delivery is to every process of the step (the tasks' own children too, e.g. a `sleep`), so a Python task
# with a USR2 handler gets it whether the signal is sent by hand or by `#SBATCH --signal=USR2@N` (no "B:").
@pytest.mark.parametrize("form, tasks_get_it, batch_gets_it", [
    ("", True, False),
    ("--batch", False, True),
    ("--full", True, True),
])
def test_scancel_usr2(slurm_cluster, tmp_path, form, tasks_get_it, batch_gets_it):
    script = write_script(tmp_path / "sig.sh", """
#SBATCH --ntasks 2 --cpus-per-task 1 --output sig-%j.out
trap 'echo batch > batch.got' USR2
srun bash -c 'trap "echo \\$SLURM_PROCID > task\\$SLURM_PROCID.got; exit 0" USR2
              touch task$SLURM_PROCID.ready
              for i in $(seq 300); do sleep 0.1; done; exit 3' &
wait  # returns early when the batch shell itself is signalled
wait
""")
    job = sbatch(script, cwd=tmp_path)
    wait_for_state(job, "RUNNING", timeout=30)
    wait_for_files([tmp_path / "task0.ready", tmp_path / "task1.ready"])  # both traps are set
    scancel(job, "--signal=USR2", *([form] if form else []))
    expected = ([tmp_path / "task0.got", tmp_path / "task1.got"] if tasks_get_it else []) + (
        [tmp_path / "batch.got"] if batch_gets_it else [])
    wait_for_files(expected, timeout=20)
    time.sleep(1.0)  # room for a signal that should not come
    got = sorted(p.name for p in tmp_path.glob("*.got"))
    try:
        scancel(job)  # the --batch case leaves the tasks running
    except SlurmError:
        pass  # already finished
    wait_for_job(job, timeout=30)
    assert got == sorted(p.name for p in expected), (form, got)


def test_pre_timeout_signal_reaches_tasks(slurm_cluster, tmp_path):
    """`--signal=USR2@55` with a 1-minute limit (what submitit's timeout handling relies on): the srun tasks
    get USR2 (slurm checks time limits periodically, so it comes early or late by tens of seconds)."""
    script = write_script(tmp_path / "warn.sh", """
#SBATCH --ntasks 2 --cpus-per-task 1 --output warn-%j.out --time 1 --signal USR2@55
srun bash -c 'trap "echo task \\$SLURM_PROCID got USR2; exit 0" USR2
              for i in $(seq 900); do sleep 0.1; done; echo task $SLURM_PROCID no signal; exit 3'
""")
    t0 = time.monotonic()
    job = sbatch(script, cwd=tmp_path)
    status = wait_for_job(job, timeout=90)
    out = (tmp_path / f"warn-{job}.out").read_text()
    print(f"pre-timeout USR2 handled, job ended {time.monotonic() - t0:.1f}s after submission")
    assert status.state == "COMPLETED", out
    assert "task 0 got USR2" in out and "task 1 got USR2" in out, out


def test_requeue(slurm_cluster, tmp_path):
    """A job requeues itself once (`scontrol requeue`), starts again and completes."""
    script = write_script(tmp_path / "rq.sh", """
#SBATCH --ntasks 1 --output rq-%j.out --open-mode append
echo "start $(date +%s.%N) restart ${SLURM_RESTART_COUNT:-0}"
if [ ! -e requeued.marker ]; then
    touch requeued.marker
    scontrol requeue $SLURM_JOB_ID
    sleep 60; echo "still running after requeue"; exit 3
fi
echo done
""")
    job = sbatch(script, cwd=tmp_path)
    seen = []  # the states the job goes through (a state shorter than the poll interval may be missed)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = job_status(job)
        if not seen or seen[-1] != status.state:
            seen.append(status.state)
        if status.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.25)
    out = (tmp_path / f"rq-{job}.out").read_text()
    starts = [float(line.split()[1]) for line in out.splitlines() if line.startswith("start ")]
    assert status.state == "COMPLETED" and status.restarts == 1, (seen, out)
    assert len(starts) == 2 and out.rstrip().endswith("done"), out
    assert "restart 1" in out, out
    delay = starts[1] - starts[0]
    print(f"requeue: restarted {delay:.1f}s after the first start; states {' -> '.join(seen)}")
    assert delay < 45, f"requeued job took {delay:.0f}s to start again (cred_expire is 10 s here)"


def test_submitit(slurm_cluster, tmp_path):
    """A 2-task submitit job: results come from the result pickles; submitit's state is UNKNOWN (no sacct)."""
    submitit = pytest.importorskip("submitit")
    import cloudpickle
    # The job's Python cannot import this test module: ship the function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition=slurm_cluster.partition, nodes=1, tasks_per_node=2,
                               cpus_per_task=1, timeout_min=5, slurm_mem="2G")
    job = executor.submit(_global_rank)
    status = wait_for_job(job.job_id, timeout=60)
    assert status.state == "COMPLETED", status
    # results() returns at once here because the pickles exist; it would wait forever for a job that died
    # without writing them (submitit's only other way to know is sacct). result() asserts on multi-task jobs.
    assert job.results() == [0, 1]
    # job.state is "UNKNOWN" here (submitit asks sacct): use job_status(job.job_id) instead.

    # A job that dies before writing its results: submitit_results raises where job.results() would hang.
    doomed = executor.submit(time.sleep, 300)
    wait_for_state(doomed.job_id, "RUNNING", timeout=30)
    scancel(doomed.job_id)
    with pytest.raises(SlurmError, match="without results"):
        submitit_results(doomed, timeout=30)


def _global_rank():
    import submitit
    return submitit.JobEnvironment().global_rank
