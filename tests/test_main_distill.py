"""main_distill.py: teachers of every kind, the five losses logged, resume with the same teacher only,
one and two processes, and the student evaluated by eval_knn.py."""
import shutil

import pytest
import torch

from conftest import (DISTILL_LOSSES as LOSSES, assert_one_error_line, distill_cmd, distill_flags, image_folder,
                      main_dino_teacher, parse, read_log, run_cmd, torchrun)
import eval_knn
import main_distill
import ssl_meta_arch
import backbones
import utils


def train(*argv):
    """main_distill.py's training in this process."""
    return main_distill.train_distill(parse(main_distill, *argv))


def test_distill_two_iterations_logs_every_loss_and_student_evaluates(distill_run, capsys):
    data, out, stdout = distill_run
    assert "Loaded the 'head.*' weights" in stdout  # the teacher's DINO head comes from its checkpoint
    assert "Online 20-NN of the student" in stdout
    records = read_log(out)
    assert len(records) == 2
    for r in records:
        for key in LOSSES:
            assert key in r and r[key] == r[key] and abs(r[key]) < 1e6, (key, r)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert "teacher" not in ckpt and len(ckpt["teacher_hash"]) == 64
    student_keys = set(ckpt["student"])
    assert "module.backbone.mask_token" in student_keys and "module.cls_loss.proj.weight" in student_keys
    assert set(ckpt) >= {"student", "optimizer", "dino_loss", "ibot_loss", "epoch", "args", "log_history"}
    # the distilled student is evaluated as is
    capsys.readouterr()
    eval_knn.eval_knn(parse(eval_knn, "--arch", "vit_tiny", "--pretrained_weights", out / "checkpoint.pth",
                            "--checkpoint_key", "student", "--data_path", data, "--resize_size", "32", "--crop_size",
                            "32", "--nb_knn", "2", "--num_workers", "0"))
    knn = capsys.readouterr().out
    assert "2-NN classifier result" in knn and "WARNING" not in knn


def test_distill_cpu_bf16_autocast(tmp_path, capsys):
    """With --amp_dtype bf16 on CPU the five losses (SPD's float64 eigendecomposition included) stay finite."""
    data = image_folder(tmp_path / "data" / "train")
    main_dino_teacher(tmp_path / "teacher.pth")
    train(*distill_flags(data, tmp_path / "run", tmp_path / "teacher.pth", "--amp_dtype", "bf16"))
    assert "Precision: bf16 autocast on CPU" in capsys.readouterr().out
    (record,) = read_log(tmp_path / "run")
    for key in LOSSES:
        assert record[key] == record[key] and abs(record[key]) < 1e6, (key, record)


def test_resume_needs_the_same_teacher(distill_run, tmp_path, capsys):
    data, run, _ = distill_run
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(run / "checkpoint.pth", out / "checkpoint.pth")
    main_dino_teacher(tmp_path / "t2.pth", seed=1)  # distill_run's teacher has seed 0
    with pytest.raises(utils.UserError, match="was trained with another teacher"):
        train(*distill_flags(data / "train", out, tmp_path / "t2.pth", "--epochs", "3"))
    capsys.readouterr()
    train(*distill_flags(data / "train", out, run.parent / "teacher.pth", "--epochs", "3"))
    assert "Found checkpoint" in capsys.readouterr().out and len(read_log(out)) == 3


def test_distill_two_processes(tmp_path):
    data = image_folder(tmp_path / "train", n_per_class=8)
    main_dino_teacher(tmp_path / "teacher.pth")
    out = tmp_path / "run"
    run_cmd(torchrun("main_distill.py", *distill_flags(data, out, tmp_path / "teacher.pth", "--centering",
                                                        "sinkhorn_knopp", "--ibot_separate_head", "true")))
    (record,) = read_log(out)
    assert all(record[k] == record[k] for k in LOSSES)


def test_meta_dinov3_teacher(tmp_path, capsys):
    meta = pytest.importorskip("meta_dinov3")
    torch.save(meta.make_meta_state_dict(seed=0), tmp_path / "dinov3_vits16.pth")
    data = image_folder(tmp_path / "train")
    train(*distill_flags(data, tmp_path / "run", tmp_path / "dinov3_vits16.pth",
                         teacher_arch="vit_small_patch16_dinov3"))
    assert "Teacher DINO head: initialised from a fixed seed and frozen" in capsys.readouterr().out
    (record,) = read_log(tmp_path / "run")
    assert all(record[k] == record[k] for k in LOSSES)


def test_teacher_tokens_are_meta_tokens(tmp_path):
    """The teacher's CLS and patch tokens (storage tokens left out) are those of Meta's own model code."""
    meta = pytest.importorskip("meta_dinov3")
    sd = meta.make_meta_state_dict(seed=1)
    torch.save(sd, tmp_path / "m.pth")
    reference = meta.dinov3_vits16()
    reference.load_state_dict(sd)
    model, _ = backbones.build_backbone("vit_small_patch16_dinov3")
    utils.load_pretrained_weights(model, str(tmp_path / "m.pth"), None)
    x = torch.randn(2, 3, 64, 48)
    cls, patches, grid = ssl_meta_arch.tokens_and_grid(model.eval(), x)
    expected = reference.eval().forward_features(x)
    assert grid == (4, 3) and patches.shape == (2, 12, 384)
    torch.testing.assert_close(cls, expected["x_norm_clstoken"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patches, expected["x_norm_patchtokens"], atol=1e-4, rtol=1e-4)


def test_resample_patch_tokens_to_the_student_grid():
    tokens = torch.arange(16, dtype=torch.float32).view(1, 16, 1).repeat(2, 1, 3)  # 4x4 grid, values 0..15
    same = main_distill.resample_patch_tokens(tokens, (4, 4), (4, 4))
    assert same is tokens
    down = main_distill.resample_patch_tokens(tokens, (4, 4), (2, 2))
    assert down.shape == (2, 4, 3)
    # a linear ramp stays a ramp, symmetric about its centre (row-major order of the 2x2 grid kept)
    v = down[0, :, 0]
    assert v[0] < v[1] < v[2] < v[3]
    assert float(v[0] + v[3]) == pytest.approx(15.0) and float(v[1] + v[2]) == pytest.approx(15.0)
    up = main_distill.resample_patch_tokens(torch.ones(1, 4, 2), (2, 2), (3, 3))  # e.g. /16 teacher, /14 student
    torch.testing.assert_close(up, torch.ones(1, 9, 2))


@pytest.mark.parametrize("extra,message", [
    ([], "--teacher_weights is required"),
    (["--allow_random_teacher", "true", "--arch", "resnet18"], "the student must be one of our ViTs"),
    (["--allow_random_teacher", "true", "--mask_patch_size", "24"], "--mask_patch_size 24"),
    (["--allow_random_teacher", "true", "--koleo_loss_weight", "-1"], "--koleo_loss_weight"),
])
def test_flag_errors(tmp_path, extra, message):
    with pytest.raises(utils.UserError, match=message):
        train(*distill_flags(tmp_path, tmp_path / "run", ""), *extra)


def test_a_flag_error_from_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    proc = run_cmd(distill_cmd(tmp_path, tmp_path / "run", ""), check=False, timeout=120)
    assert_one_error_line(proc, "--teacher_weights is required")
