"""Shared pytest fixtures and helpers (the only place for helpers that more than one test file uses): the
repository on sys.path, data, running the scripts (as subprocesses, or their main function in this process),
comparing runs, weights, and the main_dino.py / main_distill.py runs that several test files assert on."""
import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# tests/slurm's helpers; its fixture lives here, as a second conftest.py would shadow this one's module name
SLURM_TESTS = REPO_ROOT / "tests" / "slurm"
sys.path.insert(0, str(SLURM_TESTS))

import slurm_helpers  # noqa: E402

# One intra-op thread in this process too, as in the scripts the tests start (child_env), unless
# OMP_NUM_THREADS says otherwise: on a machine of two cores that other processes share (a script under test,
# its data-loader workers, another job), a second thread spins waiting for a core and makes the in-process
# tests several times slower, not faster. No result depends on it.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# Real data lives beside the project (../shared/data); DINO_DATA_ROOT overrides it.
DATA_ROOT = Path(os.environ.get("DINO_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
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
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / class_dir.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(f, dst / class_dir.name / f.name)
    return dst


@pytest.fixture(scope="session")
def cifar_subset(cifar10_root, tmp_path_factory) -> Path:
    """A 10-class, 160-image ImageFolder copied from ../shared/data/cifar10/train."""
    return make_subset(cifar10_root / "train", tmp_path_factory.mktemp("cifar_subset"), per_class=16)


@pytest.fixture(scope="session")
def cifar_40(cifar10_root, tmp_path_factory) -> Path:
    """A 10-class, 40-image ImageFolder from ../shared/data/cifar10/train: with batches of 4, 10 optimizer steps
    per epoch in one process and 5 per process in two."""
    return make_subset(cifar10_root / "train", tmp_path_factory.mktemp("cifar_40"), per_class=4)


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


def image_folder(root: Path, n_per_class=4, size=40, classes=("a", "b"), seed=0) -> Path:
    """An ImageFolder of uniform-noise images, `n_per_class` per class."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def split_folder(images: Path, dst: Path) -> Path:
    """The train/ + val/ layout of the evaluations, both `images` (symbolic links)."""
    dst.mkdir(parents=True)
    for name in ("train", "val"):
        (dst / name).symlink_to(images, target_is_directory=True)
    return dst


# ----------------------------------------------------------------------------------------------------
# Running the scripts
# ----------------------------------------------------------------------------------------------------
def run_cmd(args, cwd=REPO_ROOT, timeout=600, env=None, check=True):
    """Run a command line (list) with the repo on PYTHONPATH; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update({"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": full_env.get("OMP_NUM_THREADS", "1"),
                     # a crash (SIGABRT, SIGSEGV) prints the Python stack of every thread: a rare failure says where
                     "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
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


def torchrun(name: str, *args, nproc: int = 2) -> list:
    """Command line of one of the repository's scripts under torchrun, `nproc` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO_ROOT / name), *map(str, args)]


def parse(module, *argv) -> argparse.Namespace:
    """A script's flags, parsed as its command line would parse them (to call its main function in this
    process: no interpreter start-up)."""
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    return parser.parse_args([str(a) for a in argv])


def assert_one_error_line(proc, message: str) -> None:
    """What runtime.run_script makes of a UserError: exit code 2 and one `error:` line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-3000:]


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


def pid_of_rank(torchrun_pid: int, rank: int) -> int:
    """The main process of one rank of a torchrun: the child of torchrun with RANK=`rank` in its environment."""
    children = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"\0RANK={rank}\0".encode() in b"\0" + f.read():
                return pid
    raise AssertionError(f"rank {rank} not found among the children of torchrun ({children})")


# ----------------------------------------------------------------------------------------------------
# Comparing runs
# ----------------------------------------------------------------------------------------------------
def assert_same_log(ref: Path, resumed: Path, timing_keys: set):
    """Every epoch logged exactly once, with the same values but for the timings."""
    ref_log, res_log = read_log(ref), read_log(resumed)
    assert [r["epoch"] for r in res_log] == [r["epoch"] for r in ref_log], "every epoch logged exactly once"
    for a, b in zip(ref_log, res_log):
        assert {k: v for k, v in a.items() if k not in timing_keys} == \
               {k: v for k, v in b.items() if k not in timing_keys}


def assert_same_run(ref: Path, resumed: Path, checkpoint: str, weights: Sequence[str], optimizer_buffer: str,
                    timing_keys: set):
    """A resumed run equals the run never stopped: the same log (but timings), bit-identical `weights` (state
    dicts of the checkpoint) and optimizer state, and a final checkpoint that is an epoch checkpoint. Returns
    both checkpoints, for what else a script keeps."""
    assert_same_log(ref, resumed, timing_keys)
    a, b = load_checkpoint(ref / checkpoint), load_checkpoint(resumed / checkpoint)
    for key in weights:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa[optimizer_buffer], sb[optimizer_buffer])
    assert "position" not in b, "a finished run's checkpoint is an epoch checkpoint"
    return a, b


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------
def perturbed_state(module, seed=0):
    """A state_dict of `module` with non-trivial random values (so that every weight matters).

    Linear/conv weights ~ N(0, 1/fan_in), biases ~ 0.1 N(0,1), norm weights ~ 1 + 0.1 N(0,1),
    position embeddings and CLS token ~ N(0,1), weight-norm magnitudes ~ U(0.5, 2),
    BatchNorm running stats random (var positive).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        name = k.rsplit(".", 1)[-1]
        if name == "running_var":
            t = 0.5 + 1.5 * torch.rand(v.shape, generator=g)
        elif name == "running_mean":
            t = 0.5 * torch.randn(v.shape, generator=g)
        elif name == "weight_g":
            t = 0.5 + 1.5 * torch.rand(v.shape, generator=g)
        elif name in ("pos_embed", "cls_token", "mask_token"):
            t = torch.randn(v.shape, generator=g)
        elif v.ndim == 1 and name == "weight":  # norm layers
            t = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif v.ndim == 1:  # biases
            t = 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            t = torch.randn(v.shape, generator=g) / fan_in ** 0.5
        out[k] = t.to(v.dtype)
    return out


def official_vit_keys(embed_dim, depth, patch_size, img_size=224, in_chans=3):
    """Expected official state_dict keys and shapes, written out by hand."""
    n = (img_size // patch_size) ** 2
    d, h = embed_dim, 4 * embed_dim
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, n + 1, d),
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        keys.update({
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "mlp.fc1.weight": (h, d), p + "mlp.fc1.bias": (h,),
            p + "mlp.fc2.weight": (d, h), p + "mlp.fc2.bias": (d,),
        })
    keys.update({"norm.weight": (d,), "norm.bias": (d,)})
    return keys


class PicklePayload:
    """Unpickling this creates the file `marker` (arbitrary code execution in a real attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A main_dino.py-style checkpoint of a ViT-Tiny/8 that also carries a pickle payload."""
    import vision_transformer as vits
    weights = vits.vit_tiny(patch_size=8).state_dict()
    torch.save({"student": {f"module.backbone.{k}": v for k, v in weights.items()},
                "teacher": {f"backbone.{k}": v for k, v in weights.items()}, "epoch": 1,
                "payload": PicklePayload(marker)}, str(path))
    return path


def main_dino_teacher(path: Path, seed=0, out_dim=64):
    """A main_dino.py-style checkpoint of a ViT-Tiny/16 teacher (MultiCropWrapper keys, with its head)."""
    import utils
    import vision_transformer as vits
    torch.manual_seed(seed)
    wrapper = utils.MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, out_dim))
    torch.save({"teacher": wrapper.state_dict(), "student": {}, "epoch": 1, "args": {}}, path)
    return wrapper


# ----------------------------------------------------------------------------------------------------
# main_dino.py runs that several test files assert on
# ----------------------------------------------------------------------------------------------------
# Small but real: 32-px CIFAR images, vit_tiny/8, 2 x 32 px global + 2 x 16 px local crops, batches of 4.
DINO_FAST = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
             "--local_crops_number", "2", "--out_dim", "256", "--batch_size_per_gpu", "4", "--warmup_epochs", "1",
             "--print_freq", "1", "--saveckp_freq", "0", "--num_workers", "0"]
DINO_TIMING_KEYS = {"train_images_per_sec", "train_epoch_time"}


def with_flags(flags: Sequence, **values) -> list:
    """`flags` with the value of each `--name` in `values` replaced (or appended)."""
    flags = [str(f) for f in flags]
    for name, value in values.items():
        if f"--{name}" in flags:
            flags[flags.index(f"--{name}") + 1] = str(value)
        else:
            flags += [f"--{name}", str(value)]
    return flags


def main_dino(*args) -> list:
    return script("main_dino.py", *args)


def reference_flags(data_path: Path, out: Path, *extra) -> list:
    """The flags of `dino_reference` (those that set the numbers), in another output folder; `extra` flags come
    last (argparse keeps the last value of a flag given twice)."""
    return ["--data_path", str(data_path), "--output_dir", str(out), *with_flags(DINO_FAST, epochs=2), *map(str, extra)]


@pytest.fixture(scope="session")
def dino_reference(cifar_40, tmp_path_factory):
    """A 2-epoch main_dino.py run of 10 steps per epoch, never interrupted: the run that interrupted and
    resumed runs must equal, and whose outputs tests read. Its folder held a stale log.txt (from an earlier run
    without a checkpoint) when it started. Returns (output folder, the run's stdout)."""
    out = tmp_path_factory.mktemp("dino_reference") / "run"
    out.mkdir()
    (out / "log.txt").write_text('{"train_loss": 1.0, "epoch": 0}\n{"train_loss": 0.5, "epoch": 1}\n')
    proc = run_cmd(main_dino(*reference_flags(cifar_40, out, "--saveckp_freq", 1)))
    return out, proc.stdout


def assert_same_dino_run(ref: Path, resumed: Path):
    """Same log (but timings) and bit-identical teacher, student, optimizer state and centre."""
    a, b = assert_same_run(ref, resumed, "checkpoint.pth", ("teacher", "student"), "exp_avg", DINO_TIMING_KEYS)
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])


def after_first_epoch(reference: Path, dst: Path) -> Path:
    """A run folder as `reference` (a main_dino.py run with --saveckp_freq 1) was after its first epoch."""
    dst.mkdir(parents=True)
    shutil.copy(reference / "checkpoint0000.pth", dst / "checkpoint.pth")
    (dst / "log.txt").write_text((reference / "log.txt").read_text().splitlines(keepends=True)[0])
    return dst


@pytest.fixture(scope="session")
def torchrun_reference(cifar_40, tmp_path_factory):
    """The `dino_reference` flags in 2 processes (gloo, 5 steps per process and epoch), never interrupted.
    Returns (output folder, the run's stdout)."""
    out = tmp_path_factory.mktemp("torchrun_reference") / "run"
    proc = run_cmd(torchrun("main_dino.py", *reference_flags(cifar_40, out, "--num_workers", 1)))
    return out, proc.stdout


# ----------------------------------------------------------------------------------------------------
# main_distill.py runs
# ----------------------------------------------------------------------------------------------------
DISTILL_LOSSES = ("train_dino_loss", "train_ibot_loss", "train_koleo_loss", "train_cls_loss", "train_spd_loss")


def distill_cmd(data, out, teacher, *extra, teacher_arch="vit_tiny"):
    return [sys.executable, REPO_ROOT / "main_distill.py", *distill_flags(data, out, teacher, *extra,
                                                                         teacher_arch=teacher_arch)]


def distill_flags(data, out, teacher, *extra, teacher_arch="vit_tiny"):
    return ["--data_path", data, "--output_dir", out, "--arch", "vit_tiny", "--patch_size", "16",
            "--teacher_arch", teacher_arch, "--teacher_weights", teacher, "--global_crops_size", "32",
            "--local_crops_size", "16", "--local_crops_number", "1", "--mask_patch_size", "16",
            "--mask_probability", "1", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", *map(str, extra)]


@pytest.fixture(scope="session")
def distill_run(tmp_path_factory):
    """main_distill.py for 2 epochs of 2 steps with an online k-NN of the student, logging every iteration.
    Returns (data folder with train/ and val/, output folder, the run's stdout)."""
    root = tmp_path_factory.mktemp("distill")
    data = image_folder(root / "data" / "train")
    image_folder(root / "data" / "val", n_per_class=2, seed=1)
    main_dino_teacher(root / "teacher.pth")
    out = root / "run"
    proc = run_cmd(distill_cmd(data, out, root / "teacher.pth", "--epochs", "2", "--knn_data_path", root / "data",
                               "--log_freq", "1"))
    return root / "data", out, proc.stdout

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
