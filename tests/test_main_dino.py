"""main_dino.py: the outputs of a run (the official checkpoint format), CPU bf16, 2-process torchrun, gradient
accumulation, torchvision and timm backbones, bad images, flag errors, a non-finite loss, and resuming from an
official checkpoint. The interrupted and resumed runs are in test_resume.py and test_faults.py.

Runs whose outputs several tests read are conftest.py's `dino_reference` and `torchrun_reference`. Runs that only
check what happens inside training call `train_dino` in this process; one flag error runs the script, for the
exit code and the one-line message."""
import argparse
import re
import shutil

import pytest
import torch

import main_dino
import runtime
import utils
from conftest import (DINO_FAST, after_first_epoch, assert_one_error_line, main_dino as main_dino_cmd, parse,
                      read_log, reference_flags, run_cmd, with_flags)


def train(*argv):
    """main_dino.py's training in this process."""
    return main_dino.train_dino(parse(main_dino, *argv))


def test_single_process_run_writes_official_outputs(dino_reference):
    out, stdout = dino_reference
    assert "Precision: fp32 (CPU" in stdout
    assert f"Checkpoint: {out / 'checkpoint.pth'}" in stdout
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


def test_stale_log_without_checkpoint_is_kept_aside(dino_reference):
    """`dino_reference` started in a folder holding the log.txt of an earlier run and no checkpoint."""
    out, stdout = dino_reference
    assert "the previous log.txt is now log.txt.old" in stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    assert (out / "log.txt.old").read_text().count("\n") == 2


def test_cpu_bf16_autocast_run(cifar_40, tmp_path, capsys):
    """--amp_dtype bf16 turns on bf16 autocast on CPU; weights, optimizer state and the centre stay fp32."""
    out = tmp_path / "run"
    train("--data_path", cifar_40, "--output_dir", out, "--epochs", 1, "--amp_dtype", "bf16",
          *with_flags(DINO_FAST, batch_size_per_gpu=8))
    assert "Precision: bf16 autocast on CPU" in capsys.readouterr().out
    log = read_log(out)
    assert len(log) == 1 and 0 < log[0]["train_loss"] < 100
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    for key in ("student", "teacher", "dino_loss"):
        assert all(v.dtype == torch.float32 for v in ckpt[key].values() if v.is_floating_point()), key
    assert all(v.dtype == torch.float32 for s in ckpt["optimizer"]["state"].values()
               for v in s.values() if torch.is_tensor(v) and v.is_floating_point())


def test_precision_setup_choices():
    for amp in ("auto", "fp16"):
        autocast, scaler, desc = runtime.precision_setup(torch.device("cpu"), True, amp)
        assert desc.startswith("fp32 (CPU") and scaler is None
        with autocast():
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    autocast, scaler, desc = runtime.precision_setup(torch.device("cpu"), True, "bf16")
    assert desc.startswith("bf16 autocast on CPU") and scaler is None
    with autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    assert runtime.precision_setup(torch.device("cpu"), False, "bf16")[2] == "fp32 (--use_fp16 false)"


def test_torchrun_two_processes(torchrun_reference):
    out, stdout = torchrun_reference
    assert "distributed init (rank 0/2, gloo)" in stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    # 40 images, 4 per process and step, 2 processes: 5 steps per epoch.
    assert "5 optimizer steps per epoch" in stdout
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert all(k.startswith("module.") for k in ckpt["student"])


def test_gradient_accumulation_counts_optimizer_steps(cifar_40, tmp_path, capsys):
    out = tmp_path / "accum"
    train("--data_path", cifar_40, "--output_dir", out, "--epochs", 1, "--grad_accum_steps", 2, *DINO_FAST)
    # 40 images / 4 per batch = 10 batches = 5 optimizer steps
    assert "5 optimizer steps per epoch" in capsys.readouterr().out
    assert len(read_log(out)) == 1


def test_too_many_bad_images_stops_with_clear_message(cifar_40, tmp_path):
    shutil.copytree(cifar_40, tmp_path / "data")
    for i, class_dir in enumerate(sorted(p for p in (tmp_path / "data").iterdir() if p.is_dir())):
        (class_dir / f"broken_{i}.jpg").write_text("this is not an image")
    with pytest.raises(utils.UserError, match="unreadable images out of .*--max_bad_images_fraction"):
        train("--data_path", tmp_path / "data", "--output_dir", tmp_path / "run", "--epochs", 1,
              "--max_bad_images_fraction", 0.01, *DINO_FAST)


@pytest.mark.parametrize("flags, message", [
    (["--data_path", "/nonexistent/folder"], "--data_path /nonexistent/folder does not exist"),
    (["--global_crops_scale", "0.5"], "--global_crops_scale takes two numbers"),
    (["--local_crops_scale", "0.4", "0.05"], "--local_crops_scale takes two numbers"),
    (["--global_crops_size", "30"], "--global_crops_size 30 is not a multiple of --patch_size 8"),
    (["--arch", "vit_tinny"], "unknown --arch 'vit_tinny'"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be at least 1"),
    (["--batch_size_per_gpu", "1000"], "are not enough for one step"),
])
def test_bad_flags_give_one_clear_error(cifar_40, tmp_path, flags, message):
    args = ["--data_path", cifar_40, "--output_dir", tmp_path / "run", "--epochs", 1, *DINO_FAST]
    with pytest.raises(utils.UserError, match=re.escape(message)):
        train(*args, *flags)  # later flags win


def test_a_flag_error_from_the_command_line_is_one_line_and_exit_code_2(cifar_40, tmp_path):
    proc = run_cmd(main_dino_cmd("--data_path", cifar_40, "--output_dir", tmp_path / "run", *DINO_FAST,
                                 "--global_crops_scale", "0.5"), check=False)
    assert_one_error_line(proc, "--global_crops_scale takes two numbers")


def test_bad_boolean_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(main_dino, "--norm_last_layer", "maybe")
    assert e.value.code == 2 and "invalid value for a boolean flag" in capsys.readouterr().err


def test_unwritable_output_dir_fails_before_training(cifar_40, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(utils.UserError, match="is not writable"):
        train("--data_path", cifar_40, "--output_dir", blocker / "sub", "--epochs", 1, *DINO_FAST)
    assert "Starting DINO training" not in capsys.readouterr().out


def test_nonfinite_loss_stops_with_advice_and_keeps_last_good_checkpoint(cifar_40, dino_reference, tmp_path):
    # The reference run after its first epoch, continued with an absurd learning rate: the loss turns non-finite.
    out = after_first_epoch(dino_reference[0], tmp_path / "run")
    good = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(utils.UserError) as e:
        train(*reference_flags(cifar_40, out, "--lr", "1e38", "--warmup_epochs", 0, "--clip_grad", 0,
                               "--freeze_last_layer", 0))
    assert "Loss is nan" in str(e.value) or "Loss is inf" in str(e.value)
    assert "lower --lr" in str(e.value)
    assert (out / "checkpoint.pth").read_bytes() == good, "the last good checkpoint was overwritten"
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_resume_from_official_format_checkpoint(cifar_40, dino_reference, tmp_path, capsys):
    """A checkpoint as the official main_dino.py writes it (args as argparse.Namespace, fp16_scaler, no RNG
    state or log history) resumes."""
    out = after_first_epoch(dino_reference[0], tmp_path / "run")
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    official = {k: ckpt[k] for k in ("student", "teacher", "optimizer", "epoch", "dino_loss")}
    official["args"] = argparse.Namespace(**ckpt["args"])
    official["fp16_scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 0}
    torch.save(official, out / "checkpoint.pth")
    train(*reference_flags(cifar_40, out))
    stdout = capsys.readouterr().out
    assert "=> loaded 'student'" in stdout and "=> loaded 'teacher'" in stdout
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
def test_torchvision_and_timm_backbones(cifar_40, tmp_path, arch):
    out = tmp_path / arch
    train("--data_path", cifar_40, "--output_dir", out, "--epochs", 1, "--optimizer", "sgd", "--lr", "0.03",
          *with_flags(DINO_FAST, arch=arch, patch_size=16, batch_size_per_gpu=8))
    assert len(read_log(out)) == 1


def test_a_crop_size_too_small_for_the_backbone_stops_at_start_up_naming_the_flag():
    """A timm convnet with 32x downsampling cannot take 16 px local crops: one message before training, with
    the smallest size that works, instead of a traceback from F.conv2d in the first step."""
    import backbones

    model, _ = backbones.build_backbone("convnext_atto")
    with pytest.raises(utils.UserError, match="--local_crops_size 16 .*use --local_crops_size 32 or more"):
        backbones.check_input_sizes(model, {"--global_crops_size": 32, "--local_crops_size": 16}, "convnext_atto")
    assert model.training  # left as it was
    backbones.check_input_sizes(model, {"--global_crops_size": 64, "--local_crops_size": 32}, "convnext_atto")


def test_cpu_bf16_on_a_1x1_strided_convolution_stops_at_start_up():
    """oneDNN's bf16 backward of a strided convolution on a 1x1 input returns NaN weight gradients at times
    (torch 2.14.1, docs/performance.md): a ResNet-18 with 16 px crops in CPU bf16 stops before training with the
    way out; in fp32, or at 32 px, it trains."""
    import torchvision
    import backbones

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    sizes = {"--global_crops_size": 32, "--local_crops_size": 16}
    with pytest.raises(utils.UserError, match=r"--local_crops_size 16 gives a 1x1 map to a strided convolution "
                                              r"\(layer4\.0\.conv1\).*drop --amp_dtype bf16"
                                              r".*--local_crops_size 24 or more"):
        backbones.check_cpu_bf16_convolutions(model, sizes, "resnet18")
    assert model.training
    backbones.check_input_sizes(model, sizes, "resnet18")  # fp32: fine
    backbones.check_cpu_bf16_convolutions(model, {"--global_crops_size": 64, "--local_crops_size": 32}, "resnet18")
