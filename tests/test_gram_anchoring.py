"""DINOv3's Gram anchoring in main_dino.py (gram_anchoring.py, ssl_meta_arch.dinov2_step's `gram`): the Gram
teacher is frozen and changes only at DINOv3's refresh iterations; the loss of a step equals DINOv3's own
`GramLoss` (tests/reference_dinov3_gram.py) on the features DINOv3 would feed it; the larger crops of the Gram
teacher are the global crops at a higher resolution; a run resumes exactly with its Gram teacher; bad input ends
with one message."""
import os
import re
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import checkpointing
import gram_anchoring
import main_dino
import masking
import ssl_meta_arch
import utils
import vision_transformer as vits
from conftest import (assert_one_error_line, assert_same_run, load_checkpoint, main_dino as main_dino_cmd, parse,
                      perturbed_state, reference_flags, run_cmd, stop_when, DINO_TIMING_KEYS)
from losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss
import reference_dinov3_gram as ref_gram  # noqa: E402  (DINOv3's GramLoss beside this file)


# ----------------------------------------------------------------------------------------------------
# Units: refresh iterations, resizing, the frozen teacher
# ----------------------------------------------------------------------------------------------------
def dinov3_refreshes(every, first, max_updates, total_iters):
    """The iterations after which DINOv3's train.py calls `model.update_gram()`, by its own loop condition."""
    done, its = 0, []
    for it in range(total_iters):
        if (it + 1) >= first and (it + 1) % every == 0 and (max_updates is None or done < max_updates):
            its.append(it)
            done += 1
    return its


@pytest.mark.parametrize("every,first,max_updates,total", [(3, 0, None, 20), (10, 25, None, 100), (4, 0, 2, 30),
                                                           (7, 7, 3, 50), (5, 0, None, 4), (1, 0, None, 5)])
def test_refresh_iterations_are_dinov3s(every, first, max_updates, total):
    assert gram_anchoring.gram_refresh_iterations(every, first, max_updates, total) == \
        dinov3_refreshes(every, first, max_updates, total)
    assert gram_anchoring.gram_refresh_iterations(0, first, max_updates, total) == []


def test_resize_patch_tokens_is_dinov3s_resize():
    torch.manual_seed(0)
    tokens = torch.randn(3, 36, 8)
    # DINOv3's get_gram_teacher_output, for square grids
    n, n_student = 6, 4
    patches_hw = tokens.transpose(-2, -1).unflatten(-1, (n, n))
    want = F.interpolate(patches_hw, size=(n_student, n_student), mode="bicubic", align_corners=False,
                         antialias=False).flatten(-2, -1).transpose(-2, -1)
    assert torch.equal(gram_anchoring.resize_patch_tokens(tokens, (6, 6), (4, 4)), want)
    assert gram_anchoring.resize_patch_tokens(tokens, (6, 6), (6, 6)) is tokens
    # non-square: rows and columns kept apart
    wide = torch.randn(2, 4 * 8, 5)
    got = gram_anchoring.resize_patch_tokens(wide, (4, 8), (2, 4))
    assert got.shape == (2, 8, 5)
    assert torch.equal(got, F.interpolate(wide.transpose(1, 2).reshape(2, 5, 4, 8), size=(2, 4), mode="bicubic",
                                          align_corners=False).flatten(2).transpose(1, 2))


def tiny_vit(**kw):
    return vits.VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw)


def test_gram_teacher_is_frozen_and_changes_only_at_its_refreshes():
    torch.manual_seed(0)
    gram = gram_anchoring.GramTeacher(tiny_vit(), "test", refresh_after=[2, 5])
    assert all(not p.requires_grad for p in gram.parameters())
    gram.train()
    assert not gram.training and not gram.backbone.training, "always in eval mode (no drop-path)"
    held = {k: v.clone() for k, v in gram.backbone.state_dict().items()}
    teacher = tiny_vit()
    teacher.load_state_dict(perturbed_state(teacher))
    for it in range(7):
        refreshed = gram.maybe_refresh(it, teacher)
        assert refreshed == (it in (2, 5))
        if refreshed:
            held = {k: v.clone() for k, v in teacher.state_dict().items()}
        assert all(torch.equal(gram.backbone.state_dict()[k], v) for k, v in held.items()), it
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.01)
    assert int(gram.refreshes) == 2 and "refreshes" in gram.state_dict()


class Wrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head


def test_refresh_after_the_ema_copies_the_ema_teacher_just_updated():
    """main_dino's after_step with gram_anchoring.with_refresh: after the listed iterations the Gram teacher holds
    the EMA teacher of that moment (its update included); between them it does not move."""
    torch.manual_seed(0)
    student, teacher = Wrapper(tiny_vit(), nn.Linear(32, 4)), Wrapper(tiny_vit(), nn.Linear(32, 4))
    teacher.load_state_dict(student.state_dict())
    gram = gram_anchoring.GramTeacher(tiny_vit(), "test", refresh_after=[1, 4])
    gram.backbone.load_state_dict(teacher.backbone.state_dict())
    after_step = gram_anchoring.with_refresh(main_dino.ema_update(student, teacher, [0.5] * 6), gram,
                                             teacher.backbone)
    held = {k: v.clone() for k, v in gram.backbone.state_dict().items()}
    for it in range(6):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))  # an optimizer step
        after_step(it)
        if it in (1, 4):
            held = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
        assert all(torch.equal(gram.backbone.state_dict()[k], v) for k, v in held.items()), it
    assert int(gram.refreshes) == 2


# ----------------------------------------------------------------------------------------------------
# The loss of a step against DINOv3's GramLoss
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("larger", [False, True])
def test_step_gram_loss_equals_dinov3_reference(larger):
    """dinov2_step's gram_loss equals DINOv3's GramLoss(apply_norm=True, remove_neg=False,
    remove_only_teacher_neg=False) (its anchoring config) on the student's patch tokens of the masked global crops
    and the Gram teacher's of the unmasked crops (the larger ones resized as DINOv3 does), and it trains the
    student's backbone only."""
    torch.manual_seed(0)
    b, size, k = 3, 32, 64
    student = ssl_meta_arch.SSLModel(tiny_vit(masked_im_modeling=True), vits.DINOHead(32, k))
    teacher = ssl_meta_arch.SSLModel(tiny_vit(masked_im_modeling=True), vits.DINOHead(32, k))
    teacher.load_state_dict(student.state_dict())
    gram_backbone = tiny_vit(masked_im_modeling=True)
    gram_backbone.load_state_dict(perturbed_state(gram_backbone))
    gram = gram_anchoring.GramTeacher(gram_backbone, "test", crops_size=48 if larger else None)
    crops = [torch.randn(b, 3, size, size) for _ in range(2)] + [torch.randn(b, 3, 16, 16) for _ in range(2)]
    gram_crops = [torch.randn(b, 3, 48, 48) for _ in range(2)] if larger else []
    sampler = masking.BlockMaskSampler(size, 8, mask_ratio=(0.2, 0.5), mask_probability=1.0)
    masks = torch.stack([torch.stack([sampler() for _ in range(2)]) for _ in range(b)])  # [B, 2, N]
    mask_index = masks.transpose(0, 1).reshape(-1).nonzero().squeeze(1)
    losses = {"dino": DINOLoss(k, 4, 0.04, 0.04, 0, 1), "ibot": iBOTPatchLoss(k, 0.04, 0.04, 0, 1),
              "koleo": KoLeoLoss(), "gram": GramLoss(img_level=True)}
    weights = {"dino_loss": 1.0, "ibot_loss": 1.0, "koleo_loss": 0.1, "gram_loss": 1.0}
    step = ssl_meta_arch.dinov2_step(student, teacher, losses, weights, [0.04], gram)
    total, terms = step([crops + gram_crops, masks, mask_index], 0, 0)

    flat_masks = masks.transpose(0, 1).flatten(0, 1)
    with torch.no_grad():
        s_patch = student.backbone.forward_features(torch.cat(crops[:2]), flat_masks)[:, 1:]
        t_patch = gram.backbone.forward_features(torch.cat(gram_crops or crops[:2]))[:, 1:]
    if larger:  # DINOv3: [n_crops * B, P_T, D] -> grid -> bicubic to the student's grid
        t_patch = F.interpolate(t_patch.transpose(-2, -1).unflatten(-1, (6, 6)), size=(4, 4), mode="bicubic",
                                align_corners=False, antialias=False).flatten(-2, -1).transpose(-2, -1)
    want = ref_gram.GramLoss(apply_norm=True, remove_neg=False, remove_only_teacher_neg=False)(s_patch, t_patch,
                                                                                              img_level=True)
    assert terms["gram_loss"].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert want.item() > 1e-3, "the Gram teacher differs from the student: the loss is not trivially 0"

    total.backward()
    assert all(p.grad is None for p in gram.parameters())
    assert student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# The Gram teacher's larger crops
# ----------------------------------------------------------------------------------------------------
def test_larger_crops_are_the_global_crops_at_a_higher_resolution():
    import numpy as np
    from PIL import Image
    # a smooth image, so that the same crop at two sizes looks the same after downsampling
    y, x = np.mgrid[0:120, 0:160]
    arr = np.stack([128 + 100 * np.sin(x / 17.0), 128 + 100 * np.cos(y / 13.0), 128 + 60 * np.sin((x + y) / 23.0)],
                   -1).astype(np.uint8)
    image = Image.fromarray(arr)
    plain = augmentations.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 32, 16)
    larger = augmentations.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 32, 16, gram_crops_size=64)
    for seed in range(4):
        utils.fix_random_seeds(seed)
        a = plain(image)
        utils.fix_random_seeds(seed)
        b = larger(image)
        assert len(b) == len(a) + 2
        assert all(torch.equal(x, y) for x, y in zip(a, b)), "the student's crops do not change"
        for g, big in zip(b[:2], b[-2:]):
            assert big.shape == (3, 64, 64)
            down = F.interpolate(big[None], size=(32, 32), mode="bilinear", antialias=True)[0]
            other = b[1] if g is b[0] else b[0]
            assert (down - g).abs().mean() < 0.5 * (down - other).abs().mean()


# ----------------------------------------------------------------------------------------------------
# main_dino.py runs
# ----------------------------------------------------------------------------------------------------
def gram_flags(data, out, start, *extra):
    return reference_flags(data, out, "--ibot_loss_weight", 1, "--koleo_loss_weight", 0.1, "--pretrained_weights",
                           start, "--gram_loss_weight", 1, *extra)


def test_gram_teacher_start_is_the_starting_weights_after_the_run(dino_reference, cifar_40, tmp_path):
    ref, _ = dino_reference
    out = tmp_path / "run"
    proc = run_cmd(main_dino_cmd(*gram_flags(cifar_40, out, ref / "checkpoint.pth", "--freeze_backbone_epochs", 1,
                                             "--epochs", 2)))
    assert re.search(r"Gram teacher: the starting weights \(.*checkpoint.pth\), frozen; it sees the global crops; "
                     r"never updated", proc.stdout), proc.stdout[-3000:]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    start = {k[len("backbone."):]: v for k, v in load_checkpoint(ref / "checkpoint.pth")["teacher"].items()
             if k.startswith("backbone.")}
    gram = ckpt["gram_teacher"]
    assert int(gram["refreshes"]) == 0 and ckpt["gram_teacher_source"].startswith("the starting weights")
    assert all(torch.equal(gram[f"backbone.{k}"], v) for k, v in start.items()), "the Gram teacher never changes"
    moved = {k[len("module.backbone."):]: v for k, v in ckpt["student"].items() if k.startswith("module.backbone.")}
    assert any(not torch.equal(moved[k], v) for k, v in start.items()), "the student trained"
    log = [line for line in (out / "log.txt").read_text().splitlines() if line]
    assert all("train_gram_loss" in line for line in log)


def test_gram_run_stopped_mid_epoch_resumes_exactly(dino_reference, cifar_40, tmp_path, capsys):
    """A run with a Gram teacher refreshed from the EMA teacher every 3 iterations and fed larger crops, stopped by
    SIGTERM in epoch 1 and started again, equals the run never stopped: weights, optimizer, Gram teacher and its
    copies, log."""
    ref, _ = dino_reference
    extra = ("--gram_teacher", "ema", "--gram_update_freq", 3, "--gram_teacher_crops_size", 48)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    proc = run_cmd(main_dino_cmd(*gram_flags(cifar_40, whole, ref / "checkpoint.pth", *extra)))
    assert "the EMA teacher copied into it after 6 iteration(s): 2, 5, 8, 11, 14, 17" in proc.stdout
    assert "it sees the global crops at 48 px" in proc.stdout
    assert proc.stdout.count("Gram teacher: the EMA teacher copied in after iteration") == 6
    code, out = stop_when(main_dino_cmd(*gram_flags(cifar_40, stopped, ref / "checkpoint.pth", *extra,
                                                    "--num_workers", 2)),
                          r"Epoch: \[1/2\]\s+\[ 3/10\]", lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert code == 128 + signal.SIGTERM, out[-3000:]
    capsys.readouterr()
    main_dino.train_dino(parse(main_dino, *gram_flags(cifar_40, stopped, ref / "checkpoint.pth", *extra)))
    assert "Resuming epoch 1" in capsys.readouterr().out
    a, b = assert_same_run(whole, stopped, "checkpoint.pth", ("teacher", "student", "gram_teacher"), "exp_avg",
                           DINO_TIMING_KEYS)
    assert int(a["gram_teacher"]["refreshes"]) == int(b["gram_teacher"]["refreshes"]) == 6


def test_resuming_without_a_gram_teacher_or_with_another_is_refused(dino_reference, cifar_40, tmp_path):
    ref, _ = dino_reference
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((ref / "checkpoint.pth").read_bytes())  # written without Gram anchoring
    proc = run_cmd(main_dino_cmd(*gram_flags(cifar_40, out, ref / "checkpoint.pth")), check=False)
    assert_one_error_line(proc, "was written without Gram anchoring: it holds no Gram teacher to resume")
    ckpt = load_checkpoint(ref / "checkpoint.pth")
    ckpt["gram_teacher"], ckpt["args"] = {}, {**ckpt["args"], "gram_teacher": "ema"}
    torch.save(ckpt, out / "checkpoint.pth")
    proc = run_cmd(main_dino_cmd(*gram_flags(cifar_40, out, ref / "checkpoint.pth")), check=False)
    assert_one_error_line(proc, "was written with --gram_teacher ema, this run asks for --gram_teacher start")


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_gram_teacher_file_of_another_architecture_is_refused(cifar_40, tmp_path):
    torch.manual_seed(0)
    other = utils.MultiCropWrapper(vits.vit_small(patch_size=8), vits.DINOHead(384, 256))
    torch.save({"teacher": other.state_dict(), "args": {"arch": "vit_small", "patch_size": 8}}, tmp_path / "s.pth")
    start = tmp_path / "tiny.pth"
    torch.save(vits.vit_tiny(patch_size=8).state_dict(), start)
    proc = run_cmd(main_dino_cmd(*gram_flags(cifar_40, tmp_path / "run", start, "--gram_teacher", tmp_path / "s.pth")),
                   check=False)
    assert_one_error_line(proc, "--gram_teacher: the Gram teacher is a vit_tiny like the student")
    assert "s.pth" in proc.stderr


def test_gram_anchoring_with_a_backbone_without_patch_tokens_is_refused(cifar_40, tmp_path):
    import torchvision
    start = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), start)
    flags = reference_flags(cifar_40, tmp_path / "run", "--arch", "resnet18", "--koleo_loss_weight", 0.1,
                            "--pretrained_weights", start, "--gram_loss_weight", 1, "--global_crops_size", 64,
                            "--local_crops_size", 32)
    proc = run_cmd(main_dino_cmd(*flags), check=False)
    assert_one_error_line(proc, "Gram anchoring compares patch tokens, and --arch resnet18 has none")


@pytest.mark.parametrize("extra,message", [
    (("--gram_teacher", "ema", "--ibot_loss_weight", 1), "--gram_teacher sets Gram anchoring, which is off"),
    (("--gram_loss_weight", 1), "Gram anchoring is part of the DINOv2/DINOv3 objective here"),
    (("--gram_loss_weight", 1, "--ibot_loss_weight", 1), "random without --pretrained_weights"),
    (("--gram_loss_weight", 1, "--ibot_loss_weight", 1, "--gram_teacher", "ema"), "every --gram_update_freq"),
    (("--gram_loss_weight", 1, "--ibot_loss_weight", 1, "--pretrained_weights", "x.pth", "--gram_update_freq", 5),
     "is --gram_teacher ema"),
    (("--gram_loss_weight", 1, "--ibot_loss_weight", 1, "--gram_teacher", "/no/such.pth"), "no such file"),
    (("--gram_loss_weight", 1, "--ibot_loss_weight", 1, "--gram_teacher", "ema", "--gram_update_freq", 5,
      "--gram_teacher_crops_size", 100), "a multiple of the patch size (16)"),
    (("--gram_loss_weight", -1), "must not be negative"),
])
def test_gram_flags_are_checked(extra, message, tmp_path):
    args = parse(main_dino, "--output_dir", str(tmp_path), *map(str, extra))
    with pytest.raises(utils.UserError, match=re.escape(message)):
        main_dino.check_args(args)


def test_separate_ibot_head_starts_from_a_shared_dino_head(tmp_path):
    """A file whose DINO head also served iBOT (DINOv2's shared head) gives its weights to a separate iBOT head."""
    torch.manual_seed(0)
    source = ssl_meta_arch.SSLModel(vits.vit_tiny(patch_size=8), vits.DINOHead(192, 64))
    torch.save({"teacher": source.state_dict()}, tmp_path / "ckpt.pth")
    backbone, head, ibot_head = vits.vit_tiny(patch_size=8), vits.DINOHead(192, 64), vits.DINOHead(192, 64)
    checkpointing.init_from_pretrained(backbone, {"head.": head, "ibot_head.": ibot_head}, str(tmp_path / "ckpt.pth"),
                                       "teacher", "vit_tiny", 8)
    for name, value in source.head.state_dict().items():
        assert torch.equal(ibot_head.state_dict()[name], value) and torch.equal(head.state_dict()[name], value)


def test_meta_dinov2_file_continues_with_its_objective_warmup_and_gram_anchoring(cifar_40, tmp_path, capsys):
    """The recipe's combination on a Meta-format DINOv2 ViT-S/14 with registers (recipes/adapt_dinov2_vits14.sh, in
    miniature): fresh heads warmed up over the frozen backbone, then DINOv2's objective with the Gram teacher =
    the file, fed crops twice the size. The Gram teacher is still the file after the run; the student moved."""
    from test_dinov2_weights import reference_model
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(reference_model("dinov2_vits14_reg").state_dict(), path)
    flags = ["--data_path", str(cifar_40), "--output_dir", str(tmp_path / "run"), "--arch", "dinov2_vits14_reg4",
             "--pretrained_weights", str(path), "--global_crops_size", "28", "--local_crops_size", "14",
             "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "8", "--epochs", "2",
             "--warmup_epochs", "1", "--num_workers", "0", "--print_freq", "5", "--ibot_loss_weight", "1",
             "--koleo_loss_weight", "0.1", "--mask_probability", "1", "--layerwise_decay", "0.9",
             "--patch_embed_lr_mult", "0.2", "--freeze_backbone_epochs", "1", "--gram_loss_weight", "1",
             "--gram_teacher_crops_size", "56"]
    main_dino.train_dino(parse(main_dino, *flags))
    stdout = capsys.readouterr().out
    assert "Gram teacher: the starting weights" in stdout and "at 56 px" in stdout, stdout[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    meta = torch.load(path, weights_only=True)
    gram = ckpt["gram_teacher"]
    assert all(torch.equal(gram[f"backbone.{k}"], v) for k, v in meta.items())
    student = {k.removeprefix("module."): v for k, v in ckpt["student"].items()}
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], meta["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3", "vit_tiny"])
def test_pooled_feature_and_patch_tokens_come_from_one_pass(arch):
    """KoLeo-only runs with Gram anchoring (any ViT, e.g. a timm DINOv3 backbone, which cannot mask) read the
    pooled feature and the patch tokens from one forward: the feature is what `model(x)` gives."""
    import backbones
    torch.manual_seed(0)
    model, dim = backbones.build_backbone(arch, 16)
    model.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        pooled, patches = ssl_meta_arch.features_and_patches(model, x)
        assert torch.allclose(pooled, model(x), atol=1e-6)
    assert patches.shape == (2, 12, dim) and backbones.has_patch_tokens(model)
