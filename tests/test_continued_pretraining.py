"""Continued pretraining (--pretrained_weights, --freeze_backbone_epochs, --backbone_lr_scale) and the
backbone-only export (export_backbone.py)."""
import torch

from conftest import REPO_ROOT, main_dino, reference_flags, run_cmd, script


def backbone_of(state_dict: dict) -> dict:
    """The backbone of a checkpoint's network (the student's keys carry DDP's `module.`, as officially)."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}


def heads_of(state_dict: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state_dict.items() if k.removeprefix("module.").startswith("head.")}


def export(checkpoint, output, *flags):
    return run_cmd(script("export_backbone.py", checkpoint, output, *flags))


def test_export_writes_the_plain_backbone_state_dict(dino_reference, tmp_path):
    ref, _ = dino_reference
    proc = export(ref / "checkpoint.pth", tmp_path / "backbone.pth")
    exported = torch.load(tmp_path / "backbone.pth", weights_only=True)
    teacher = torch.load(ref / "checkpoint.pth", weights_only=False)["teacher"]
    assert set(exported) == set(backbone_of(teacher)) and all(isinstance(v, torch.Tensor) for v in exported.values())
    assert all(torch.equal(exported[k], v) for k, v in backbone_of(teacher).items())
    assert "vit_tiny/8 backbone" in proc.stdout
    # what eval_knn.py does with --pretrained_weights: a strict fit, no ignored head
    import checkpointing
    import vision_transformer as vits
    model = vits.vit_tiny(patch_size=8)
    checkpointing.load_pretrained_weights(model, str(tmp_path / "backbone.pth"), "teacher", "vit_tiny", 8)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())


def test_exported_vits16_loads_into_torch_hub(tmp_path):
    import utils
    import vision_transformer as vits
    torch.manual_seed(0)
    wrapper = utils.MultiCropWrapper(vits.vit_small(patch_size=16), vits.DINOHead(384, 64))
    torch.save({"teacher": wrapper.state_dict(), "student": wrapper.state_dict(),
                "args": {"arch": "vit_small", "patch_size": 16}}, tmp_path / "checkpoint.pth")
    export(tmp_path / "checkpoint.pth", tmp_path / "vits16.pth")
    model = torch.hub.load(str(REPO_ROOT), "dino_vits16", source="local", weights=str(tmp_path / "vits16.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in wrapper.backbone.state_dict().items())


def test_export_refuses_a_wrong_architecture_and_its_own_input(dino_reference, tmp_path):
    ref, _ = dino_reference
    proc = run_cmd(script("export_backbone.py", ref / "checkpoint.pth", tmp_path / "b.pth", "--arch", "vit_small"),
                   check=False)
    assert proc.returncode == 2 and "are not a vit_small" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b.pth").exists()
    proc = run_cmd(script("export_backbone.py", ref / "checkpoint.pth", ref / "checkpoint.pth"), check=False)
    assert proc.returncode == 2 and "is the checkpoint itself" in proc.stderr


def test_head_warmup_freezes_the_backbone_then_trains_it(dino_reference, cifar_40, tmp_path):
    """--freeze_backbone_epochs 1 from a backbone-only file: after epoch 0 the backbones of student and teacher
    are bit for bit the file's while the heads trained; after epoch 1 both backbones have moved."""
    ref, _ = dino_reference
    export(ref / "checkpoint.pth", tmp_path / "backbone.pth")
    start = torch.load(tmp_path / "backbone.pth", weights_only=True)
    out = tmp_path / "run"
    proc = run_cmd(main_dino(*reference_flags(cifar_40, out, "--pretrained_weights", tmp_path / "backbone.pth",
                                              "--freeze_backbone_epochs", 1, "--saveckp_freq", 1)))
    assert "backbone loaded; head fresh" in proc.stdout, proc.stdout
    after0 = torch.load(out / "checkpoint0000.pth", weights_only=False)
    after1 = torch.load(out / "checkpoint0001.pth", weights_only=False)
    for net in ("student", "teacher"):
        frozen = backbone_of(after0[net])
        assert set(frozen) == set(start) and all(torch.equal(frozen[k], v) for k, v in start.items()), net
        moved = backbone_of(after1[net])
        assert any(not torch.equal(moved[k], v) for k, v in start.items()), net
    # the heads trained during the warm-up: the teacher's head followed the student's away from its start
    heads0 = heads_of(after0["student"])
    assert any(not torch.equal(heads0[k], v) for k, v in heads_of(after1["student"]).items())


def test_heads_come_from_a_full_checkpoint_and_the_backbone_lr_is_scaled(dino_reference, cifar_40, tmp_path):
    ref, _ = dino_reference
    out = tmp_path / "run"
    proc = run_cmd(main_dino(*reference_flags(cifar_40, out, "--pretrained_weights", ref / "checkpoint.pth",
                                              "--backbone_lr_scale", 0.1, "--epochs", 1)))
    assert "backbone loaded; head from the file" in proc.stdout, proc.stdout
    groups = torch.load(out / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 0.1, 0.1]
    assert [g["regularized"] for g in groups] == [True, False, True, False]
    assert abs(groups[2]["lr"] - 0.1 * groups[0]["lr"]) < 1e-12 and groups[0]["lr"] > 0
    assert groups[1]["weight_decay"] == groups[3]["weight_decay"] == 0 and groups[2]["weight_decay"] > 0
    # a resumed run does not read the weights again
    proc = run_cmd(main_dino(*reference_flags(cifar_40, out, "--pretrained_weights", ref / "checkpoint.pth",
                                              "--backbone_lr_scale", 0.1, "--epochs", 1)))
    assert "--pretrained_weights not read" in proc.stdout


def test_warmup_flags_are_checked():
    import main_dino as md
    import utils
    parser = md.get_args_parser()
    for flags, message in ((["--freeze_backbone_epochs", "2"], "needs --pretrained_weights"),
                           (["--freeze_backbone_epochs", "3", "--epochs", "3", "--pretrained_weights", "x.pth"],
                            "leaves no epoch"),
                           (["--backbone_lr_scale", "-1"], "must not be negative")):
        try:
            md.check_args(parser.parse_args(flags))
        except utils.UserError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{flags} accepted")


def test_distillation_student_starts_from_pretrained_weights(tmp_path, capsys):
    """main_distill.py's student from a backbone-only file (which has no mask token: it stays initialised),
    frozen for the first of two epochs."""
    import main_distill
    import vision_transformer as vits
    from conftest import distill_flags, image_folder, main_dino_teacher, parse
    data = image_folder(tmp_path / "train", n_per_class=4)
    main_dino_teacher(tmp_path / "teacher.pth")
    torch.manual_seed(1)
    start = vits.vit_tiny(patch_size=16).state_dict()
    torch.save(start, tmp_path / "student.pth")
    out = tmp_path / "run"
    main_distill.train_distill(parse(main_distill, *distill_flags(
        data, out, tmp_path / "teacher.pth", "--pretrained_weights", tmp_path / "student.pth", "--ibot_separate_head",
        "true", "--freeze_backbone_epochs", 1, "--epochs", 2, "--saveckp_freq", 1)))
    assert "backbone loaded; head, ibot_head fresh" in capsys.readouterr().out
    frozen = backbone_of(torch.load(out / "checkpoint0000.pth", weights_only=True)["student"])
    assert all(torch.equal(frozen[k], v) for k, v in start.items()) and "mask_token" in frozen
    moved = backbone_of(torch.load(out / "checkpoint0001.pth", weights_only=True)["student"])
    assert any(not torch.equal(moved[k], v) for k, v in start.items())
