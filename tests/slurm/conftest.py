"""The `slurm_cluster` fixture: a real single-node SLURM cluster for the session (see cluster.sh).

Every test under tests/slurm is marked `slurm` (deselect them with `-m "not slurm"`). Tests that request
`slurm_cluster` skip, with a one-line reason, when not root, when DINO_SKIP_SLURM=1, or when apt-get cannot
install slurm/munge; they error (with the daemons' log lines) if the packages are there but the cluster does not
come up. A cluster that was already running before the session is reused and left running; one started here
is torn down at the end (DINO_KEEP_SLURM=1 keeps it, e.g. to look at its logs in /tmp/dino-slurm).
"""
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import slurm_helpers  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: uses a real single-node SLURM cluster (tests/slurm; needs root)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
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
