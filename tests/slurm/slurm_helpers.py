"""Helpers for tests that run jobs on a real single-node SLURM cluster (started by tests/slurm/cluster.sh).

The cluster has no accounting database, so `sacct` fails and submitit reports every job as UNKNOWN
(`job.state`), and `job.wait()`/`job.results()` only return once the result pickles exist (they wait forever
for a job that died without writing them). Ask slurmctld instead: `job_info`, `wait_for_job`, `wait_for_state`
read `scontrol show job -o JOBID`, which shows finished jobs for an hour (MinJobAge=3600).

    ok, reason = slurm_available()
    cluster = start_cluster()                    # installs the packages if needed, then `cluster.sh up`
    status = wait_for_job(job_id, timeout=60)    # JobStatus(state='COMPLETED', restarts=0, exit_code='0:0', info={...})
    results = submitit_results(job)              # job.results() that fails instead of hanging
    stop_cluster()
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, NamedTuple, Optional, Tuple, Union

CLUSTER_SH = Path(__file__).resolve().with_name("cluster.sh")
# Where cluster.sh keeps slurm.conf, state, pid and log files (it reads the same variable).
SLURM_DIR = Path(os.environ.get("DINO_SLURM_DIR", "/tmp/dino-slurm"))
SLURM_CONF = SLURM_DIR / "slurm.conf"
PARTITION = "debug"
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
# States a job never leaves by itself (besides TERMINAL_STATES): waiting for something else is pointless then.
FINAL_STATES = TERMINAL_STATES + ("NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REQUEUE_HOLD")
_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")


class SlurmError(RuntimeError):
    """cluster.sh or a slurm command failed; the message carries its output."""


@dataclass(frozen=True)
class SlurmCluster:
    """What the `slurm_cluster` fixture yields."""
    dir: Path          # slurm.conf, state, pid and log files (slurmctld.log, slurmd.log)
    conf: Path         # also linked from /etc/slurm/slurm.conf, and exported as $SLURM_CONF during the tests
    node: str          # the single node (`hostname -s`)
    partition: str     # "debug", the default partition
    cpus: int


class JobStatus(NamedTuple):
    state: str         # JobState, e.g. "COMPLETED"
    restarts: int      # how many times the job was requeued (Restarts=)
    exit_code: str     # "exit:signal", e.g. "0:0"
    info: Dict[str, str]  # every field of `scontrol show job -o`


def slurm_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A copy of `env` (default os.environ) pointing slurm commands at our cluster's config."""
    env = dict(os.environ if env is None else env)
    env["SLURM_CONF"] = str(SLURM_CONF)
    return env


def slurm_installed() -> bool:
    return all(shutil.which(c) for c in _COMMANDS)


def slurm_available() -> Tuple[bool, str]:
    """Whether a cluster can be brought up here, and why not: (True, how) or (False, reason)."""
    if os.environ.get("DINO_SKIP_SLURM") == "1":
        return False, "DINO_SKIP_SLURM=1"
    if not sys.platform.startswith("linux"):
        return False, f"SLURM tests need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "SLURM tests need root (slurmd and munged are started locally); run as root or set DINO_SKIP_SLURM=1"
    if slurm_installed():
        return True, "slurm and munge installed"
    if shutil.which("apt-get") is None:
        return False, "slurm/munge not installed and apt-get not found to install them"
    return True, "slurm/munge not installed yet; apt-get can try"


def _run_cluster_sh(command: str, timeout: float) -> str:
    try:
        proc = subprocess.run(["bash", str(CLUSTER_SH), command], env=slurm_env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"cluster.sh {command} timed out after {timeout:.0f}s") from e
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise SlurmError(f"cluster.sh {command} failed (exit {proc.returncode}):\n{output}")
    return output


def install_slurm(timeout: float = 900) -> Tuple[bool, str]:
    """`cluster.sh install` (a no-op when installed): (True, message) or (False, the last lines of apt's error)."""
    try:
        return True, _run_cluster_sh("install", timeout)
    except SlurmError as e:
        return False, str(e)


def cluster_running() -> bool:
    """Whether our cluster is up and healthy (`cluster.sh status` exits 0)."""
    return subprocess.run(["bash", str(CLUSTER_SH), "status"], env=slurm_env(), capture_output=True,
                          timeout=60).returncode == 0


def start_cluster(install: bool = True, timeout: float = 120) -> SlurmCluster:
    """Install the packages if needed (and `install`), then `cluster.sh up` (reuses a healthy running cluster).

    Raises SlurmError (with the script's output and log tails) on failure."""
    if not slurm_installed():
        if not install:
            raise SlurmError("slurm/munge not installed (run: bash tests/slurm/cluster.sh install)")
        ok, message = install_slurm()
        if not ok:
            raise SlurmError(message)
    _run_cluster_sh("up", timeout)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    return SlurmCluster(dir=SLURM_DIR, conf=SLURM_CONF, node=node, partition=PARTITION, cpus=os.cpu_count() or 1)


def stop_cluster(timeout: float = 120) -> None:
    """`cluster.sh down`: cancel all jobs, kill our daemons, remove SLURM_DIR and the /etc/slurm/slurm.conf link."""
    _run_cluster_sh("down", timeout)


def _scontrol(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], env=slurm_env(), capture_output=True, text=True, timeout=timeout)


# A field starts with a key made of letters, digits and : / _ - right after the start or a space,
# e.g. "JobState=", "AllocNode:Sid=", "CPUs/Task="; values may contain "=" (TRES=cpu=2,mem=2G) and spaces.
_FIELD = re.compile(r"(?:^|(?<= ))([A-Za-z][\w:/-]*)=")


def parse_scontrol_line(line: str) -> Dict[str, str]:
    """`Key=value Key2=value two ...` (one line of `scontrol show ... -o`) as a dict of strings."""
    matches = list(_FIELD.finditer(line.strip()))
    out = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(line.strip())
        out[m.group(1)] = line.strip()[m.end():end].rstrip()
    return out


def job_info(job_id: Union[int, str]) -> Dict[str, str]:
    """Every field of `scontrol show job -o JOBID` (JobState, Restarts, ExitCode, NodeList, StdOut, ...).

    Raises SlurmError when slurmctld does not know the job (purged, or never existed)."""
    proc = _scontrol("show", "job", "-o", str(job_id))
    if proc.returncode != 0:
        raise SlurmError(f"scontrol show job {job_id}: {(proc.stdout + proc.stderr).strip()}")
    for line in proc.stdout.splitlines():  # an array job prints one line per task: pick ours
        info = parse_scontrol_line(line)
        if info.get("JobId") == str(job_id):
            return info
    lines = proc.stdout.splitlines()
    if not lines:
        raise SlurmError(f"scontrol show job {job_id}: no output")
    return parse_scontrol_line(lines[0])


def job_status(job_id: Union[int, str]) -> JobStatus:
    """The job's state, restart count and exit code now (what submitit's job.state cannot tell here)."""
    info = job_info(job_id)
    return JobStatus(state=info.get("JobState", "UNKNOWN"), restarts=int(info.get("Restarts", "0") or 0),
                     exit_code=info.get("ExitCode", ""), info=info)


def wait_for_job(job_id: Union[int, str], states: Iterable[str] = TERMINAL_STATES, timeout: float = 120,
                 poll: float = 0.25) -> JobStatus:
    """Poll `scontrol show job` until the job is in one of `states`; return its JobStatus (restarts included).

    Raises TimeoutError (with the last state) after `timeout` seconds, and SlurmError if the job reaches a
    final state (e.g. NODE_FAIL, or COMPLETED while waiting for RUNNING) that is not in `states`."""
    states = (states,) if isinstance(states, str) else tuple(states)
    deadline = time.monotonic() + timeout
    while True:
        status = job_status(job_id)
        if status.state in states:
            return status
        if status.state in FINAL_STATES:
            raise SlurmError(f"job {job_id} ended {status.state} (exit {status.exit_code}, reason "
                             f"{status.info.get('Reason')}) while waiting for {'/'.join(states)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.state} (reason {status.info.get('Reason')}) after "
                               f"{timeout:.0f}s waiting for {'/'.join(states)}")
        time.sleep(poll)


def wait_for_state(job_id: Union[int, str], state: Union[str, Iterable[str]], timeout: float = 60,
                   poll: float = 0.25) -> JobStatus:
    """Poll until the job is in `state` (e.g. "RUNNING"); same errors as wait_for_job.

    A state that lasts less than `poll` can be missed (a job that requeues itself at once is RUNNING for
    ~0.1 s): use it for jobs that stay in that state, and Restarts for requeues."""
    return wait_for_job(job_id, states=state, timeout=timeout, poll=poll)


def submitit_results(job, timeout: float = 120) -> list:
    """`job.results()` of a submitit job without its wait on sacct: wait with scontrol for the job to end, then
    read every task's result pickle; raise SlurmError (with the tasks' stderr tails) if one is missing,
    where `job.results()` would wait forever here. Re-raises the job's own exception like submitit does."""
    status = wait_for_job(job.job_id, timeout=timeout)
    tasks = [job.task(i) for i in range(job.num_tasks)]
    # The pickles are written just before the tasks exit (also for an exception: FAILED); allow for a slow disk.
    deadline = time.monotonic() + (5 if status.state in ("COMPLETED", "FAILED") else 1)
    while not all(t.paths.result_pickle.exists() for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.2)
    missing = [t for t in tasks if not t.paths.result_pickle.exists()]
    if missing:
        tails = "\n".join(f"--- task {t.task_id} stderr ({t.paths.stderr}):\n"
                           + "\n".join((t.stderr() or "").splitlines()[-15:]) for t in missing)
        raise SlurmError(f"job {job.job_id} ended {status.state} (exit {status.exit_code}) without results for "
                         f"task(s) {[t.task_id for t in missing]}\n{tails}")
    return job.results()


def sbatch(script: Union[str, Path], *args: str, cwd: Optional[Union[str, Path]] = None) -> str:
    """Submit a batch script (path) with extra sbatch arguments; return the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=slurm_env(), capture_output=True,
                          text=True, cwd=cwd, timeout=60)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(args)} {script}: {(proc.stdout + proc.stderr).strip()}")
    return proc.stdout.strip().split(";")[0]


def scancel(job_id: Union[int, str], *args: str) -> None:
    proc = subprocess.run(["scancel", *args, str(job_id)], env=slurm_env(), capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise SlurmError(f"scancel {' '.join(args)} {job_id}: {(proc.stdout + proc.stderr).strip()}")
