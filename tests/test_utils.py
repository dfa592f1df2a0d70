"""utils.py and runtime.py: flags, distributed set-up, checkpoints, schedules, gradients, models, logging, plots.

CPU only; models are small (or small inputs), files live in tmp_path.
"""
import argparse
import builtins
import errno
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from conftest import PicklePayload, run_cmd
import official_dino  # the reference beside this file (pytest puts tests/ on sys.path)
import checkpointing
import backbones
import runtime
import tracking
import utils
import vision_transformer as vits


@pytest.fixture(autouse=True)
def _restore_print(monkeypatch):
    """init_distributed_mode replaces builtins.print; put the original back after every test."""
    monkeypatch.setattr(builtins, "print", builtins.print)


# ----------------------------------------------------------------------------------------------------
# Flags and SLURM
# ----------------------------------------------------------------------------------------------------
OFFICIAL_HELPERS = ("bool_flag", "fix_random_seeds", "get_sha", "is_dist_avail_and_initialized", "get_world_size",
                    "get_rank", "is_main_process", "save_on_master", "setup_for_distributed", "init_distributed_mode",
                    "restart_from_checkpoint", "load_pretrained_weights", "cosine_scheduler", "clip_gradients",
                    "cancel_gradients_last_layer", "get_params_groups", "has_batchnorms", "MultiCropWrapper",
                    "SmoothedValue", "MetricLogger")


def test_official_helper_names_stay_importable_from_utils():
    """Code written against the official utils.py keeps working: every official helper we keep is reachable as
    utils.NAME, wherever it lives (the process helpers in runtime.py, the checkpoint ones in checkpointing.py),
    with the official parameter names."""
    import inspect
    missing = [name for name in OFFICIAL_HELPERS if not callable(getattr(utils, name, None))]
    assert not missing, missing
    assert list(inspect.signature(utils.restart_from_checkpoint).parameters)[:2] == ["ckp_path", "run_variables"]
    assert list(inspect.signature(utils.save_on_master).parameters)[:1] == ["obj"]
    assert list(inspect.signature(utils.cosine_scheduler).parameters) == [
        "base_value", "final_value", "epochs", "niter_per_ep", "warmup_epochs", "start_warmup_value"]


@pytest.mark.parametrize("s,expected", [("true", True), ("True", True), ("on", True), ("1", True),
                                        ("false", False), ("FALSE", False), ("off", False), ("0", False)])
def test_bool_flag(s, expected):
    assert utils.bool_flag(s) is expected


@pytest.mark.parametrize("s", ["yes?", "", "2", "truthy"])
def test_bool_flag_rejects(s):
    with pytest.raises(argparse.ArgumentTypeError):
        utils.bool_flag(s)


def test_bool_flag_in_argparse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--norm_last_layer", type=utils.bool_flag, default=True)
    assert parser.parse_args(["--norm_last_layer", "false"]).norm_last_layer is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--norm_last_layer", "maybe"])


@pytest.mark.parametrize("nodelist,expected", [
    ("node01", "node01"),
    ("gpu[003-005,010]", "gpu003"),
    ("a[1-2],b3", "a1"),
    ("cn-[0017,0020]", "cn-0017"),
    ("node07,node08", "node07"),
    ("gpu[010]", "gpu010"),
])
def test_first_slurm_host(nodelist, expected):
    assert runtime.first_slurm_host(nodelist) == expected


# ----------------------------------------------------------------------------------------------------
# init_distributed_mode
# ----------------------------------------------------------------------------------------------------
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k in DIST_VARS or k.startswith("SLURM_") or k.startswith("TORCHELASTIC"):
            monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _check_single_process(args):
    assert args.rank == 0 and args.world_size == 1 and args.gpu == 0
    assert args.device == torch.device("cpu")
    assert not dist.is_initialized()
    assert utils.get_rank() == 0 and utils.get_world_size() == 1 and utils.is_main_process()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU device")
def test_init_distributed_plain_python(clean_env, capsys):
    args = argparse.Namespace()
    utils.init_distributed_mode(args)
    _check_single_process(args)
    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ
    assert "single process" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU device")
def test_init_distributed_one_task_slurm(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[003-004]")
    clean_env.setenv("SLURM_JOB_ID", "12345")
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    _check_single_process(args)
    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU device")
def test_init_distributed_torchrun_single(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "0")
    args = argparse.Namespace()
    utils.init_distributed_mode(args)
    _check_single_process(args)


END_OF_RUN_SCRIPT = """
import argparse, atexit, os, sys, threading, time
import runtime
import utils

def main(args):
    utils.init_distributed_mode(args)
    stem = os.path.join(args.out, f"rank{utils.get_rank()}")
    def late_writer():
        time.sleep(0.5)
        with open(stem + ".thread", "w") as f:
            f.write("done")
    threading.Thread(target=late_writer).start()  # not a daemon: a normal exit waits for it
    atexit.register(lambda: open(stem + ".atexit", "w").write("done"))
    sys.stdout.write(f"rank {utils.get_rank()}: last words without a newline")

parser = argparse.ArgumentParser()
parser.add_argument("--out")
runtime.add_distributed_args(parser)
runtime.run_script(main, parser.parse_args())
"""


def test_run_script_ends_a_two_process_run_as_a_normal_exit_would(tmp_path):
    """run_script leaves a finished multi-process run without the interpreter's finalisation (see
    runtime.leave_without_finalization); what a normal exit does for the user's code must still happen:
    non-daemon threads finish, atexit handlers run, buffered output reaches stdout, exit code 0."""
    script = tmp_path / "end_of_run.py"
    script.write_text(END_OF_RUN_SCRIPT)
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    script, "--out", tmp_path], timeout=300)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.thread").read_text() == "done"
        assert (tmp_path / f"rank{rank}.atexit").read_text() == "done"
        assert f"rank {rank}: last words without a newline" in proc.stdout


def test_setup_for_distributed_silences_non_master(capsys):
    utils.setup_for_distributed(False)
    print("hidden line")
    print("forced line", force=True)
    utils.print_all_ranks("all ranks line")
    utils.setup_for_distributed(True)
    print("master line")
    out = capsys.readouterr().out
    assert "hidden line" not in out
    assert "forced line" in out and "all ranks line" in out and "master line" in out


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------
def _tmp_leftovers(directory):
    return [n for n in os.listdir(directory) if ".tmp" in n]


def test_save_checkpoint_roundtrip(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    checkpointing.atomic_save({"w": torch.arange(4.0), "epoch": 3}, path)
    loaded = checkpointing.load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))
    checkpointing.atomic_save({"w": torch.zeros(2), "epoch": 4}, path)  # overwrite
    assert checkpointing.load_checkpoint(path)["epoch"] == 4
    assert _tmp_leftovers(tmp_path) == []


def test_save_checkpoint_atomic_when_save_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    checkpointing.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial checkpoint bytes" * 100)  # some bytes, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(utils.UserError) as e:
        checkpointing.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path in str(e.value)
    loaded = checkpointing.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))  # previous file intact
    assert _tmp_leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["checkpoint.pth"]


def _disk_full_after(limit):
    """An `open` that behaves like a disk filling up after `limit` bytes written."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wxa"):  # read-only
            return f
        write, written = f.write, [0]

        def limited_write(b):
            written[0] += memoryview(b).nbytes
            if written[0] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(b)

        f.write = limited_write
        return f

    return fake_open


def test_save_checkpoint_atomic_when_disk_fills_during_real_torch_save(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    checkpointing.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(checkpointing, "open", _disk_full_after(1000), raising=False)
    try:
        with pytest.raises(utils.UserError) as e:
            checkpointing.atomic_save({"epoch": 2, "w": torch.randn(100_000)}, path)
        assert path in str(e.value)
    finally:
        monkeypatch.undo()
        assert checkpointing.load_checkpoint(path)["epoch"] == 1  # the previous file is intact in any case
    assert _tmp_leftovers(tmp_path) == []


def test_atomic_write_is_the_one_writer_of_text_and_binary_files(tmp_path):
    """checkpointing.atomic_write, which every file the project writes goes through: text and binary, the
    permissions a plain open() gives (umask applied), and a failed write leaves the previous file as it was,
    no temporary behind, and one message that names the file."""
    path = str(tmp_path / "meta.json")
    checkpointing.atomic_write(path, lambda f: json.dump({"a": 1}, f), mode="w")
    checkpointing.atomic_write(str(tmp_path / "x.bin"), lambda f: f.write(b"\x00\x01"))
    assert json.loads(open(path).read()) == {"a": 1} and open(tmp_path / "x.bin", "rb").read() == b"\x00\x01"
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask

    def fails(f):
        f.write("{\"a\": 2, ")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(utils.UserError, match=r"could not write file list cache .*meta\.json: .*No space left"):
        checkpointing.atomic_write(path, fails, mode="w", what="file list cache")
    assert json.loads(open(path).read()) == {"a": 1}
    assert _tmp_leftovers(tmp_path) == []


def test_remove_stale_temporaries_removes_dead_writers_files_only(tmp_path):
    """The temporaries of atomic_write (`.NAME.tmpPID.XXXXXXXX`, and the older `.NAME.tmpPID`) of a process that
    is gone are removed; those of a live process (a write in progress) and other files stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".checkpoint.pth.tmp{dead.pid}.0a1b2c3d": False, f".log.txt.tmp{dead.pid}": False,
             f".features.npy.tmp{os.getppid()}.deadbeef": True, ".hidden": True, "log.txt": True,
             f"checkpoint.pth.tmp{dead.pid}": True}
    for name in names:
        (tmp_path / name).write_text("x")
    checkpointing.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, kept in names.items() if kept)


def test_save_checkpoint_unwritable_folder(tmp_path):
    path = str(tmp_path / "missing_dir" / "checkpoint.pth")
    with pytest.raises(utils.UserError, match="missing_dir"):
        checkpointing.atomic_save({"epoch": 1}, path)


def test_load_checkpoint_with_namespace(tmp_path):
    """Official DINO checkpoints hold args as an argparse.Namespace."""
    path = str(tmp_path / "official.pth")
    ns = argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005, norm_last_layer=True)
    torch.save({"teacher": {"w": torch.ones(2)}, "args": ns, "epoch": 100}, path)
    ckpt = checkpointing.load_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].arch == "vit_small"
    assert torch.equal(ckpt["teacher"]["w"], torch.ones(2)) and ckpt["epoch"] == 100


def test_load_checkpoint_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    path = str(tmp_path / "evil.pth")
    torch.save({"student": {"w": torch.ones(1)}, "payload": PicklePayload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(utils.UserError) as e:
        checkpointing.load_checkpoint(path)
    assert path in str(e.value)
    assert not marker.exists()
    # the payload is real: an unrestricted load does run it (so the check above can fail)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_checkpoint_refuses_plain_pickle_payload(tmp_path):
    marker = tmp_path / "PWNED2"
    path = str(tmp_path / "evil.pkl")
    with open(path, "wb") as f:
        pickle.dump({"payload": PicklePayload(marker)}, f)
    with pytest.raises(utils.UserError, match="evil.pkl"):
        checkpointing.load_checkpoint(path)
    assert not marker.exists()


def _write_corrupt(tmp_path, kind):
    if kind == "truncated":
        good = tmp_path / "good.pth"
        torch.save({"w": torch.randn(1000)}, str(good))
        b = good.read_bytes()
        path = tmp_path / "truncated.pth"
        path.write_bytes(b[: len(b) // 2])
    elif kind == "flipped":
        good = tmp_path / "good.pth"
        torch.save({"w": torch.randn(1000)}, str(good))
        b = bytearray(good.read_bytes())
        b[-200:] = bytes(200)  # zero the zip central directory
        path = tmp_path / "flipped.pth"
        path.write_bytes(bytes(b))
    elif kind == "empty":
        path = tmp_path / "empty.pth"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.pth"
        path.write_text("hello world\n")
    elif kind == "csv":
        path = tmp_path / "log.pth"
        path.write_text("epoch,loss\n1,2\n")
    else:
        path = tmp_path / "json.pth"
        path.write_text(json.dumps({"epoch": 1}) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["truncated", "flipped", "empty", "json", "text", "csv"])
def test_load_checkpoint_corrupt_file(tmp_path, kind):
    path = _write_corrupt(tmp_path, kind)
    with pytest.raises(utils.UserError) as e:
        checkpointing.load_checkpoint(path)
    assert path in str(e.value)


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(utils.UserError, match="nothere.pth"):
        checkpointing.load_checkpoint(str(tmp_path / "nothere.pth"))


class _DDPLike(nn.Module):
    """Keys prefixed with `module.`, as DistributedDataParallel's."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _net(out=3):
    torch.manual_seed(out)
    return nn.Sequential(nn.Linear(4, out), nn.LayerNorm(out))


def test_restart_from_ddp_prefixed_into_plain(tmp_path, capsys):
    src = _DDPLike(_net())
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src.module(torch.randn(2, 4)).sum().backward()
    opt.step()
    center = torch.randn(1, 3)
    path = str(tmp_path / "checkpoint.pth")
    checkpointing.atomic_save({"student": src.state_dict(), "optimizer": opt.state_dict(), "epoch": 5,
                           "dino_loss": {"center": center}, "log_history": [{"epoch": 4}]}, path)
    assert all(k.startswith("module.") for k in src.state_dict())

    dst = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    dst_opt = torch.optim.SGD(dst.parameters(), lr=0.1, momentum=0.9)

    class Center(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("center", torch.zeros(1, 3))

    loss = Center()
    run_variables = {"epoch": 0, "log_history": [], "not_in_checkpoint": 7}
    ckpt = utils.restart_from_checkpoint(path, run_variables=run_variables, student=dst, optimizer=dst_opt,
                                         dino_loss=loss, teacher=None, missing_key=nn.Linear(1, 1))
    assert isinstance(ckpt, dict)
    for k, v in src.module.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(loss.center, center)
    assert run_variables == {"epoch": 5, "log_history": [{"epoch": 4}], "not_in_checkpoint": 7}
    momentum = dst_opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])
    assert "missing_key" in capsys.readouterr().out


def test_restart_from_plain_into_ddp_prefixed(tmp_path):
    src = _net()
    path = str(tmp_path / "checkpoint.pth")
    checkpointing.atomic_save({"teacher": src.state_dict()}, path)
    dst = _DDPLike(_net(out=3))
    torch.nn.init.zeros_(dst.module[0].weight)
    utils.restart_from_checkpoint(path, teacher=dst)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.module.state_dict()[k], v), k


def test_restart_mismatch_raises_user_error(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    checkpointing.atomic_save({"student": _net(3).state_dict(), "optimizer": {"state": {}, "param_groups": []}}, path)
    with pytest.raises(utils.UserError) as e:  # shape mismatch
        utils.restart_from_checkpoint(path, student=_net(5))
    assert path in str(e.value) and "student" in str(e.value)
    with pytest.raises(utils.UserError, match="student"):  # key mismatch
        utils.restart_from_checkpoint(path, student=nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 3)))
    opt = torch.optim.SGD(_net(3).parameters(), lr=0.1)
    with pytest.raises(utils.UserError, match="optimizer"):  # optimizer with another number of groups
        utils.restart_from_checkpoint(path, optimizer=opt)


def test_restart_missing_file_returns_none(tmp_path):
    run_variables = {"epoch": 0}
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert utils.restart_from_checkpoint(str(tmp_path / "none.pth"), run_variables=run_variables,
                                         student=net) is None
    assert run_variables == {"epoch": 0}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_restart_not_a_dict(tmp_path):
    path = str(tmp_path / "list.pth")
    torch.save([torch.ones(1)], path)
    with pytest.raises(utils.UserError, match="list.pth"):
        utils.restart_from_checkpoint(path, student=_net())


# ----------------------------------------------------------------------------------------------------
# Schedules, parameter groups, gradients
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [(0.5, 1e-6, 10, 7, 2, 0.0), (0.996, 1.0, 5, 3, 0, 0), (1e-3, 1e-5, 4, 1, 1, 1e-4),
                                  (0.04, 0.04, 3, 5, 0, 0)])
def test_cosine_scheduler_matches_official(args):
    ours = utils.cosine_scheduler(*args)
    ref = official_dino.cosine_scheduler(*args)
    assert isinstance(ours, np.ndarray) and len(ours) == args[2] * args[3]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_cosine_scheduler_values():
    s = utils.cosine_scheduler(1.0, 0.0, epochs=4, niter_per_ep=5, warmup_epochs=1, start_warmup_value=0.2)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], np.linspace(0.2, 1.0, 5))
    assert s[5] == pytest.approx(1.0)
    assert np.all(np.diff(s[5:]) < 0) and 0.0 < s[-1] < 0.02
    assert s[5 + 15 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))


@pytest.mark.parametrize("epochs,niter,warmup", [(3, 4, 10), (2, 5, 2), (1, 1, 5), (0, 5, 1), (3, 0, 1)])
def test_cosine_scheduler_warmup_longer_than_training(epochs, niter, warmup):
    s = utils.cosine_scheduler(0.1, 0.001, epochs, niter, warmup_epochs=warmup, start_warmup_value=0.0)
    assert len(s) == epochs * niter
    if len(s):
        assert np.all(np.isfinite(s)) and s[0] == pytest.approx(0.0)
        assert np.all(np.diff(s) >= -1e-12) and s.max() <= 0.1 + 1e-12  # still warming up: non-decreasing


class _GroupsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))  # 1-D, not named bias
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.frozen = nn.Parameter(torch.ones(8, 8), requires_grad=False)


def test_get_params_groups():
    net = _GroupsNet()
    groups = utils.get_params_groups(net)
    assert len(groups) == 2
    reg, noreg = {id(p) for p in groups[0]["params"]}, {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    assert reg == {id(net.pos_embed), id(net.fc.weight), id(net.conv.weight)}
    assert noreg == {id(net.fc.bias), id(net.norm.weight), id(net.norm.bias), id(net.scale)}
    # works with an optimizer
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.04)


def test_get_params_groups_vit_biases():
    model = vits.VisionTransformer(patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_bias=True)
    groups = utils.get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    noreg_names = {names[id(p)] for p in groups[1]["params"]}
    assert all(n.endswith(".bias") or "norm" in n for n in noreg_names)
    assert "blocks.0.attn.qkv.bias" in noreg_names and "norm.weight" in noreg_names
    assert "blocks.0.attn.qkv.weight" not in noreg_names
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_clip_gradients_per_parameter():
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(3, 4))
    model.b = nn.Parameter(torch.zeros(5))
    model.c = nn.Parameter(torch.zeros(2))  # no gradient
    ga = torch.randn(3, 4)
    model.a.grad = ga / ga.norm() * 10
    gb = torch.randn(5)
    model.b.grad = gb / gb.norm() * 1
    b_before = model.b.grad.clone()
    a_dir = model.a.grad / model.a.grad.norm()
    norms = utils.clip_gradients(model, 3.0)
    assert torch.allclose(norms, torch.tensor([10.0, 1.0]), rtol=1e-5)
    assert model.a.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert torch.allclose(model.a.grad / model.a.grad.norm(), a_dir, atol=1e-6)  # direction kept
    assert torch.equal(model.b.grad, b_before)  # below the threshold: untouched
    assert model.c.grad is None


def test_cancel_gradients_last_layer():
    head = vits.DINOHead(8, 16, hidden_dim=16, bottleneck_dim=8)
    head(torch.randn(2, 8)).sum().backward()
    utils.cancel_gradients_last_layer(epoch=0, model=head, freeze_last_layer=1)
    assert all(p.grad is None for n, p in head.named_parameters() if "last_layer" in n)
    assert all(p.grad is not None for n, p in head.named_parameters() if "last_layer" not in n and p.requires_grad)
    head.zero_grad(set_to_none=False)
    head(torch.randn(2, 8)).sum().backward()
    utils.cancel_gradients_last_layer(epoch=1, model=head, freeze_last_layer=1)
    assert any(p.grad is not None for n, p in head.named_parameters() if "last_layer" in n)


# ----------------------------------------------------------------------------------------------------
# MultiCropWrapper and build_backbone
# ----------------------------------------------------------------------------------------------------
def _reference(wrapper, crops, per_crop):
    """One backbone forward per crop, or per resolution (crops of one size batched), then the head."""
    with torch.no_grad():
        if per_crop:
            return torch.cat([wrapper.head(_feat(wrapper.backbone(c))) for c in crops])
        feats, start = [], 0
        for n in _run_lengths([c.shape[-1] for c in crops]):
            feats.append(_feat(wrapper.backbone(torch.cat(crops[start:start + n]))))
            start += n
        return wrapper.head(torch.cat(feats))


def _feat(out):
    return out[0] if isinstance(out, tuple) else out


def _check_wrapper(arch, sizes, batch=2, out_dim=16, per_crop=True):
    torch.manual_seed(0)
    backbone, dim = backbones.build_backbone(arch) if isinstance(arch, str) else arch
    head = nn.Linear(dim, out_dim)
    wrapper = utils.MultiCropWrapper(backbone, head).eval()
    crops = [torch.randn(batch, 3, s, s) for s in sizes]
    calls = []
    wrapper.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        out = wrapper(crops)
    runs = 1 + sum(sizes[i] != sizes[i - 1] for i in range(1, len(sizes)))
    assert calls == [batch * n for n in _run_lengths(sizes)] and len(calls) == runs
    assert out.shape == (len(sizes) * batch, out_dim)
    ref = _reference(wrapper, crops, per_crop)
    assert not torch.allclose(ref[:batch], ref[batch:2 * batch])  # different crops, different rows
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    return backbone, dim


def _run_lengths(sizes):
    out = [1]
    for a, b in zip(sizes, sizes[1:]):
        if a == b:
            out[-1] += 1
        else:
            out.append(1)
    return out


def test_multicrop_wrapper_torchvision_resnet18():
    backbone, dim = _check_wrapper("resnet18", [64, 64, 32, 32, 32])
    assert dim == 512 and type(backbone).__module__.startswith("torchvision")


def test_multicrop_wrapper_our_vit():
    small_vit = vits.VisionTransformer(patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_bias=True)
    _check_wrapper((small_vit, 64), [64, 64, 32, 32, 48])


def test_multicrop_wrapper_timm_vit():
    pytest.importorskip("timm")
    backbone, dim = _check_wrapper("vit_tiny_patch16_224", [224, 224, 96, 96], batch=1, per_crop=False)
    assert dim == 192 and type(backbone).__module__.startswith("timm")


def test_multicrop_wrapper_timm_convnet():
    pytest.importorskip("timm")
    backbone, dim = _check_wrapper("convnext_atto", [64, 64, 32], batch=2)
    assert dim == 320 and type(backbone).__module__.startswith("timm")


def test_multicrop_wrapper_single_tensor_and_crop_major_order():
    wrapper = utils.MultiCropWrapper(nn.Flatten(), nn.Identity())
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = wrapper([a, b])
    assert out.shape == (4, 4) and torch.equal(out[:2], torch.zeros(2, 4)) and torch.equal(out[2:], torch.ones(2, 4))
    assert torch.equal(wrapper(a), torch.zeros(2, 4))


def test_build_backbone_unknown_arch():
    with pytest.raises(utils.UserError) as e:
        backbones.build_backbone("vit_smal")
    msg = str(e.value)
    assert "vit_smal" in msg and "vit_small" in msg.split("Did you mean", 1)[-1]


def test_build_backbone_deit_alias():
    model, dim = backbones.build_backbone("deit_small")
    assert isinstance(model, vits.VisionTransformer) and dim == 384 and model.embed_dim == 384
    assert len(model.blocks) == 12
    model8, _ = backbones.build_backbone("vit_small", patch_size=8)
    assert model8.patch_embed.patch_size == 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 384)


# ----------------------------------------------------------------------------------------------------
# Logging and plots
# ----------------------------------------------------------------------------------------------------
def test_smoothed_value_with_tensors():
    v = utils.SmoothedValue(window_size=3)
    for x in (1.0, 2.0, 3.0, 4.0):
        v.update(torch.tensor(x, requires_grad=True) * 1)
    assert v.median == pytest.approx(3.0) and v.avg == pytest.approx(3.0)
    assert v.global_avg == pytest.approx(2.5) and v.max == pytest.approx(4.0) and v.value == pytest.approx(4.0)
    assert not (isinstance(v.total, torch.Tensor) and v.total.requires_grad)
    v.update(torch.tensor(10.0), n=6)
    assert v.global_avg == pytest.approx((1 + 2 + 3 + 4 + 60) / 10)
    assert str(v) == f"{v.median:.6f} ({v.global_avg:.6f})"
    mixed = utils.SmoothedValue()
    mixed.update(1)
    mixed.update(torch.tensor(3.0))
    assert mixed.global_avg == pytest.approx(2.0)


def test_metric_logger_log_every(capsys):
    logger = utils.MetricLogger(delimiter="  ")
    items = list(range(7))
    seen = []
    for i in logger.log_every(items, print_freq=3, header="Epoch: [0]", images_per_iter=8):
        logger.update(loss=torch.tensor(float(i)), lr=0.1, skipped=None)
        seen.append(i)
    assert seen == items
    assert "skipped" not in logger.meters
    assert logger.loss.global_avg == pytest.approx(3.0) and logger.lr.value == pytest.approx(0.1)
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if "eta" in line]
    assert len(progress) == 3  # iterations 0, 3 and 6 (the last)
    assert all("img/s" in line and "Epoch: [0]" in line and "loss: " in line for line in progress)
    assert "[0/7]" in progress[0] and "[6/7]" in progress[-1]
    assert "Total time" in lines[-1]
    with pytest.raises(AttributeError):
        logger.not_a_meter


def test_plot_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        for epoch in range(3):
            f.write(json.dumps({"train_loss": 10.0 - epoch, "train_lr": 1e-4 * epoch, "train_wd": 0.04,
                                "note": "text is skipped", "epoch": epoch}) + "\n")
    out = tracking.plot_training_curves(str(log), str(tmp_path / "curves.png"))
    assert out == str(tmp_path / "curves.png")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    from PIL import Image
    w, h = Image.open(tmp_path / "curves.png").size
    assert w > h > 100  # three panels side by side


def test_plot_training_curves_empty_log(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "log.txt").write_text("")
    assert tracking.plot_training_curves(str(tmp_path / "log.txt"), str(tmp_path / "c.png")) is None
    assert not (tmp_path / "c.png").exists()


def test_write_json_lines_atomic(tmp_path):
    path = str(tmp_path / "log.txt")
    tracking.write_json_lines(path, [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.0}])
    with open(path) as f:
        assert [json.loads(line) for line in f] == [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 1.0}]
    assert os.listdir(tmp_path) == ["log.txt"]
