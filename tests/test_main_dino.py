"""End to end: main_dino.py on a small CIFAR-10 subset, single process and 2-process torchrun (gloo)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT, read_log, run_cmd, script

# Small but real: 32-px CIFAR images, vit_tiny/8, 2 x 32 px global + 2 x 16 px local crops.
FAST = ["--arch", "vit_tiny", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--out_dim", "256", "--batch_size_per_gpu", "16", "--warmup_epochs", "1",
        "--print_freq", "2", "--saveckp_freq", "1"]


def main_dino(*args):
    return script("main_dino.py", *args)


def test_single_process_run_writes_official_outputs(cifar_subset, tmp_path):
    out = tmp_path / "run"
    proc = run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", out, "--epochs", 2, "--num_workers", 0, *FAST))
    assert "Precision: fp32 (CPU" in proc.stdout
    assert f"Checkpoint: {out / 'checkpoint.pth'}" in proc.stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    for r in log:
        assert {"train_loss", "train_lr", "train_wd", "train_images_per_sec", "train_epoch_time",
                "train_bad_images"} <= set(r)
        assert r["train_bad_images"] == 0
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "checkpoint0000.pth").is_file() and (out / "checkpoint0001.pth").is_file()

    # Official checkpoint format, loadable with weights_only=True and no allow-listing (args is a dict).
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict) and ckpt["args"]["arch"] == "vit_tiny"
    assert all(k.startswith("module.") for k in ckpt["student"])
    assert "module.backbone.cls_token" in ckpt["student"] and "backbone.cls_token" in ckpt["teacher"]
    assert ckpt["dino_loss"]["center"].shape == (1, 256)
    # The teacher backbone loads into a plain ViT with strict=True once the official prefix is stripped.
    import vision_transformer as vits
    model = vits.vit_tiny(patch_size=8)
    backbone = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    model.load_state_dict(backbone, strict=True)
    # Training moved the teacher away from the student's initialisation but the EMA keeps them close.
    assert not torch.equal(ckpt["teacher"]["backbone.cls_token"], torch.zeros(1, 1, 192))


def test_cpu_bf16_autocast_run(cifar_subset, tmp_path):
    """--amp_dtype bf16 turns on bf16 autocast on CPU; weights, optimizer state and the centre stay fp32."""
    out = tmp_path / "run"
    proc = run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", out, "--epochs", 1, "--num_workers", 0,
                             "--amp_dtype", "bf16", *FAST))
    assert "Precision: bf16 autocast on CPU" in proc.stdout
    log = read_log(out)
    assert len(log) == 1 and 0 < log[0]["train_loss"] < 100
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    for key in ("student", "teacher", "dino_loss"):
        assert all(v.dtype == torch.float32 for v in ckpt[key].values() if v.is_floating_point()), key
    assert all(v.dtype == torch.float32 for s in ckpt["optimizer"]["state"].values()
               for v in s.values() if torch.is_tensor(v) and v.is_floating_point())


def test_precision_setup_choices():
    import utils

    for amp in ("auto", "fp16"):
        autocast, scaler, desc = utils.precision_setup(torch.device("cpu"), True, amp)
        assert desc.startswith("fp32 (CPU") and scaler is None
        with autocast():
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    autocast, scaler, desc = utils.precision_setup(torch.device("cpu"), True, "bf16")
    assert desc.startswith("bf16 autocast on CPU") and scaler is None
    with autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    assert utils.precision_setup(torch.device("cpu"), False, "bf16")[2] == "fp32 (--use_fp16 false)"


def _kill_after_first_checkpoint(cmd, out, timeout=300):
    """Start `cmd`, SIGKILL it as soon as the first checkpoint exists; return the epoch it holds."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while not (out / "checkpoint.pth").exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read().decode()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint within the time limit")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its data-loader workers, at once
    proc.wait()
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"]


def test_kill9_then_resume_equals_uninterrupted(cifar_subset, tmp_path):
    """kill -9 after an epoch, start the same command again: same losses and same teacher weights."""
    common = ["--data_path", cifar_subset, "--epochs", 3, "--num_workers", 2, *FAST]
    ref, interrupted = tmp_path / "ref", tmp_path / "interrupted"
    run_cmd(main_dino(*common, "--output_dir", ref))

    killed_at = _kill_after_first_checkpoint(main_dino(*common, "--output_dir", interrupted), interrupted)
    assert killed_at < 3, "the run finished before it could be killed: make the epochs longer"
    proc = run_cmd(main_dino(*common, "--output_dir", interrupted))
    assert "Found checkpoint at" in proc.stdout

    ref_log, res_log = read_log(ref), read_log(interrupted)
    assert [r["epoch"] for r in res_log] == [0, 1, 2], "every epoch logged exactly once"
    for a, b in zip(ref_log, res_log):
        for key in ("train_loss", "train_lr", "train_wd"):
            assert a[key] == b[key], (key, a, b)
    ref_ckpt = torch.load(ref / "checkpoint.pth", map_location="cpu", weights_only=True)
    res_ckpt = torch.load(interrupted / "checkpoint.pth", map_location="cpu", weights_only=True)
    for key in ("teacher", "student"):
        for name, value in ref_ckpt[key].items():
            assert torch.equal(value, res_ckpt[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(ref_ckpt["dino_loss"]["center"], res_ckpt["dino_loss"]["center"])


def test_torchrun_two_processes(cifar_subset, tmp_path):
    out = tmp_path / "ddp"
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    REPO_ROOT / "main_dino.py", "--data_path", cifar_subset, "--output_dir", out, "--epochs", 2,
                    "--num_workers", 1, *FAST])
    assert "distributed init (rank 0/2, gloo)" in proc.stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    # 160 images, 16 per process and step, 2 processes: 5 steps per epoch.
    assert "5 optimizer steps per epoch" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert all(k.startswith("module.") for k in ckpt["student"])


def test_gradient_accumulation_counts_optimizer_steps(cifar_subset, tmp_path):
    out = tmp_path / "accum"
    proc = run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", out, "--epochs", 1, "--num_workers", 0,
                             "--grad_accum_steps", 2, *FAST))
    # 160 images / 16 per batch = 10 batches = 5 optimizer steps
    assert "5 optimizer steps per epoch" in proc.stdout
    assert len(read_log(out)) == 1


def _corrupt_dataset(src, dst, n_bad):
    import shutil
    shutil.copytree(src, dst)
    classes = sorted(p for p in dst.iterdir() if p.is_dir())
    bad = []
    for i in range(n_bad):
        target = classes[i % len(classes)] / f"broken_{i}.jpg"
        if i % 3 == 0:
            target.write_bytes(b"")  # empty
        elif i % 3 == 1:
            target.write_text("this is not an image")
        else:
            good = next(classes[0].iterdir()).read_bytes()
            target.write_bytes(good[: len(good) // 3])  # truncated JPEG
        bad.append(target)
    return bad


def test_bad_images_are_skipped_reported_and_counted(cifar_subset, tmp_path):
    bad = _corrupt_dataset(cifar_subset, tmp_path / "data", n_bad=3)
    out = tmp_path / "run"
    proc = run_cmd(main_dino("--data_path", tmp_path / "data", "--output_dir", out, "--epochs", 1, "--num_workers", 2,
                             "--max_bad_images_fraction", 0.05, *FAST))
    for path in bad:
        assert proc.stdout.count(f"skipped unreadable image {path}") == 1, proc.stdout[-3000:]
    # 163 images, 160 used per epoch (drop_last): almost surely all 3 bad files were drawn
    assert read_log(out)[0]["train_bad_images"] in (2, 3)


def test_too_many_bad_images_stops_with_clear_message(cifar_subset, tmp_path):
    _corrupt_dataset(cifar_subset, tmp_path / "data", n_bad=12)
    proc = run_cmd(main_dino("--data_path", tmp_path / "data", "--output_dir", tmp_path / "run", "--epochs", 1,
                             "--num_workers", 0, "--max_bad_images_fraction", 0.01, *FAST), check=False)
    assert proc.returncode == 2
    assert "unreadable images out of" in proc.stderr and "--max_bad_images_fraction" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--data_path", "/nonexistent/folder"], "--data_path /nonexistent/folder does not exist"),
    (["--global_crops_scale", "0.5"], "--global_crops_scale takes two numbers"),
    (["--local_crops_scale", "0.4", "0.05"], "--local_crops_scale takes two numbers"),
    (["--global_crops_size", "30"], "--global_crops_size 30 is not a multiple of --patch_size 8"),
    (["--arch", "vit_tinny"], "unknown --arch 'vit_tinny'"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be at least 1"),
    (["--batch_size_per_gpu", "1000"], "are not enough for one step"),
])
def test_bad_flags_give_one_clear_error(cifar_subset, tmp_path, flags, message):
    args = ["--data_path", cifar_subset, "--output_dir", tmp_path / "run", "--epochs", 1, "--num_workers", 0, *FAST]
    args += flags  # later flags win
    proc = run_cmd(main_dino(*args), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_boolean_flag_is_an_argparse_error(tmp_path):
    proc = run_cmd(main_dino("--norm_last_layer", "maybe"), check=False)
    assert proc.returncode == 2 and "invalid value for a boolean flag" in proc.stderr


def test_unwritable_output_dir_fails_before_training(cifar_subset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", blocker / "sub", "--epochs", 1,
                             "--num_workers", 0, *FAST), check=False)
    assert proc.returncode == 2 and "is not writable" in proc.stderr
    assert "Starting DINO training" not in proc.stdout


def test_nonfinite_loss_stops_with_advice_and_keeps_last_good_checkpoint(cifar_subset, tmp_path):
    out = tmp_path / "run"
    common = ["--data_path", cifar_subset, "--output_dir", out, "--num_workers", 0, *FAST]
    run_cmd(main_dino(*common, "--epochs", 1))
    good = (out / "checkpoint.pth").read_bytes()
    # Same run continued for a second epoch with an absurd learning rate: the loss turns non-finite.
    proc = run_cmd(main_dino(*common, "--epochs", 2, "--lr", "1e38", "--warmup_epochs", 0, "--clip_grad", 0,
                             "--freeze_last_layer", 0), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert "Loss is nan" in proc.stderr or "Loss is inf" in proc.stderr
    assert "lower --lr" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == good, "the last good checkpoint was overwritten"
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_resume_from_official_format_checkpoint(cifar_subset, tmp_path):
    """A checkpoint as the official main_dino.py writes it (args as argparse.Namespace, fp16_scaler, no RNG
    state or log history) resumes."""
    import argparse
    out = tmp_path / "run"
    common = ["--data_path", cifar_subset, "--output_dir", out, "--num_workers", 0, *FAST]
    run_cmd(main_dino(*common, "--epochs", 1))
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    official = {k: ckpt[k] for k in ("student", "teacher", "optimizer", "epoch", "dino_loss")}
    official["args"] = argparse.Namespace(**ckpt["args"])
    official["fp16_scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 0}
    torch.save(official, out / "checkpoint.pth")
    proc = run_cmd(main_dino(*common, "--epochs", 2))
    assert "=> loaded 'student'" in proc.stdout and "=> loaded 'teacher'" in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_torchvision_and_timm_backbones(cifar_subset, tmp_path, arch):
    out = tmp_path / arch
    flags = [f for f in FAST]
    flags[flags.index("--arch") + 1] = arch
    flags[flags.index("--patch_size") + 1] = "16"
    run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", out, "--epochs", 1, "--num_workers", 0,
                      "--optimizer", "sgd", "--lr", "0.03", *flags))
    assert len(read_log(out)) == 1


def test_stale_log_without_checkpoint_is_kept_aside(cifar_subset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text('{"train_loss": 1.0, "epoch": 0}\n{"train_loss": 0.5, "epoch": 1}\n')
    proc = run_cmd(main_dino("--data_path", cifar_subset, "--output_dir", out, "--epochs", 1, "--num_workers", 0,
                             *FAST))
    assert "the previous log.txt is now log.txt.old" in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [0]
    assert (out / "log.txt.old").read_text().count("\n") == 2
