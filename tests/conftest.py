"""Shared pytest fixtures: repository root on sys.path, the real-data location, small helpers."""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# tests/slurm's helpers; its fixture lives here, as a second conftest.py would shadow this one's module name
SLURM_TESTS = REPO_ROOT / "tests" / "slurm"
sys.path.insert(0, str(SLURM_TESTS))

import slurm_helpers  # noqa: E402

# Real data lives beside the project (../shared/data); DINO_DATA_ROOT overrides it.
DATA_ROOT = Path(os.environ.get("DINO_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    root = DATA_ROOT / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"real data not found at {root} (set DINO_DATA_ROOT or place ../shared/data beside the repo)")
    return root


def make_subset(src: Path, dst: Path, per_class: int, classes: int = 10) -> Path:
    """Copy the first `per_class` images of the first `classes` class folders of `src` into `dst`."""
    import shutil
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / class_dir.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(f, dst / class_dir.name / f.name)
    return dst


@pytest.fixture(scope="session")
def cifar_subset(cifar10_root, tmp_path_factory) -> Path:
    """A 10-class, 160-image ImageFolder copied from ../shared/data/cifar10/train."""
    return make_subset(cifar10_root / "train", tmp_path_factory.mktemp("cifar_subset"), per_class=16)


def noise_image(size=(48, 40), seed=0):
    """A colourful RGB image (no two channels equal anywhere)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[..., 1] = (arr[..., 0].astype(np.int32) + 85) % 256  # channels always differ
    arr[..., 2] = (arr[..., 0].astype(np.int32) + 170) % 256
    return Image.fromarray(arr, mode="RGB")


@pytest.fixture
def tiny_folder(tmp_path):
    """11 colourful 24x24 images in 2 classes (11: not a multiple of the batch size or of 2 ranks)."""
    root = tmp_path / "imgs"
    for i in range(11):
        cls = "a" if i % 2 else "b"
        os.makedirs(root / cls, exist_ok=True)
        noise_image((24, 24), seed=i).save(root / cls / f"{i:02d}.png")
    return root


def run_cmd(args, cwd=REPO_ROOT, timeout=600, env=None, check=True):
    """Run a command line (list) with the repo on PYTHONPATH; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": full_env.get("OMP_NUM_THREADS", "1"),
                     "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    # A session of its own: on a timeout the whole group (torchrun's workers, data-loader workers) is killed.
    with subprocess.Popen([str(a) for a in args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            stdout, stderr = p.communicate()
            raise AssertionError(f"command timed out after {timeout} s: {' '.join(map(str, args))}\n"
                                 f"--- stdout ---\n{stdout[-5000:]}\n--- stderr ---\n{stderr[-5000:]}")
    proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc



def child_env(**extra) -> dict:
    """Environment of a script run by a test: the repo importable, one thread (the same bits in every run of
    a comparison), unbuffered output (lines arrive as they are printed)."""
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def script(name: str, *args) -> list:
    """Command line of one of the repository's scripts."""
    return [sys.executable, str(REPO_ROOT / name), *map(str, args)]


def read_log(out_dir: Path, name: str = "log.txt") -> list:
    """The JSON lines a run wrote."""
    with open(Path(out_dir) / name) as f:
        return [json.loads(line) for line in f]


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def kill_group(pgid: int, signum=signal.SIGKILL):
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def stop_when(cmd, pattern: str, send, timeout: float = 600, env: Optional[dict] = None):
    """Run `cmd` in a session of its own (a signal to the group reaches its data-loader workers too, as on
    SLURM); when a line of its output matches `pattern`, call `send(proc)`; return (exit code, output).

    The output comes through a pipe of one page, read line by line: the run cannot get more than a page (a few
    progress lines) ahead of the line matched, so that what `send` does lands within a few iterations of it
    however loaded the machine. The process group is always killed in the end."""
    proc = subprocess.Popen([str(a) for a in cmd], env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0, start_new_session=True)
    watchdog = threading.Timer(timeout, kill_group, (proc.pid,))
    lines, sent = [], False
    try:
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        watchdog.start()
        for line in iter(proc.stdout.readline, b""):
            lines.append(line.decode(errors="replace"))
            if not sent and re.search(pattern, lines[-1]):
                send(proc)
                sent = True
        proc.wait(timeout=120)
    finally:
        watchdog.cancel()
        kill_group(proc.pid)  # never leave a run or its workers behind, whatever failed
        proc.wait()
        proc.stdout.close()
    assert sent, "the pattern never appeared:\n" + "".join(lines[-30:])
    return proc.returncode, "".join(lines)


def assert_same_log(ref: Path, resumed: Path, timing_keys: set):
    """Every epoch logged exactly once, with the same values but for the timings."""
    ref_log, res_log = read_log(ref), read_log(resumed)
    assert [r["epoch"] for r in res_log] == [r["epoch"] for r in ref_log], "every epoch logged exactly once"
    for a, b in zip(ref_log, res_log):
        assert {k: v for k, v in a.items() if k not in timing_keys} == \
               {k: v for k, v in b.items() if k not in timing_keys}

# ----------------------------------------------------------------------------------------------------
# A real single-node SLURM cluster for tests/slurm (see tests/slurm/cluster.sh)
# ----------------------------------------------------------------------------------------------------
# Every test under tests/slurm is marked `slurm` (deselect them with `-m "not slurm"`). Tests that request
# `slurm_cluster` skip, with a one-line reason, when not root, when DINO_SKIP_SLURM=1, or when apt-get cannot
# install slurm/munge; they error (with the daemons' log lines) if the packages are there but the cluster does
# not come up. A cluster that was already running before the session is reused and left running; one started
# here is torn down at the end (DINO_KEEP_SLURM=1 keeps it, e.g. to look at its logs in /tmp/dino-slurm).
def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: uses a real single-node SLURM cluster (tests/slurm; needs root)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLURM_TESTS in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_cluster():
    ok, reason = slurm_helpers.slurm_available()
    if not ok:
        pytest.skip(f"SLURM tests skipped: {reason}")
    if not slurm_helpers.slurm_installed():
        installed, message = slurm_helpers.install_slurm()
        if not installed:
            last = message.strip().splitlines()[-1] if message.strip() else "apt-get failed"
            pytest.skip(f"SLURM tests skipped: could not install slurm/munge ({last})")
    was_running = slurm_helpers.cluster_running()
    try:
        cluster = slurm_helpers.start_cluster(install=False)
    except slurm_helpers.SlurmError as e:
        pytest.fail(f"SLURM cluster did not come up (set DINO_SKIP_SLURM=1 to skip these tests):\n{e}",
                    pytrace=False)
    # Slurm clients (sbatch, scontrol, submitit's sbatch) read $SLURM_CONF, else /etc/slurm/slurm.conf,
    # which cluster.sh links to ours unless another slurm.conf is already there.
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
        if not was_running and os.environ.get("DINO_KEEP_SLURM") != "1":
            slurm_helpers.stop_cluster()
