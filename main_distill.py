# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Distillation of a frozen pretrained teacher into a small student, the way DINOv2/DINOv3 make their small
models:

    python main_distill.py --teacher_arch vit_large_patch16_dinov3 --teacher_weights dinov3_vitl16.pth \
        --arch vit_small --patch_size 16 --data_path /path/to/imagenet/train --output_dir out/distill

The teacher never changes (no EMA, no gradients, not in DDP, not in the checkpoint: its path and a hash of
its weights are). The student (one of our ViTs, with a DINO head, an iBOT head and a learnable mask token)
learns from five losses, each in its own file of `losses/`:

1. DINO: the teacher's CLS prototypes of the 2 global crops against the student's of every crop.
2. iBOT: the teacher's patch prototypes against the student's at the patches masked in the student's input.
3. KoLeo: spreads the student's CLS features of each global crop over the sphere.
4. CLS token: cosine distance between a learned projection of the student's CLS token and the teacher's.
5. SPD: squared Log-Euclidean distance between the patch-token Gram matrices of student and teacher
   (`--gram_loss_weight` adds DINOv3's Gram anchoring, an MSE between them).

Everything else (schedules, optimizer, clipping, mixed precision, DDP, checkpoints, resume, online k-NN,
curves) is the loop of main_dino.py, in engine.py; the flags of main_dino.py apply.
"""
import argparse
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import checkpointing
import engine
import eval_knn
import health
import main_dino
import runtime
import ssl_meta_arch
import utils
import vision_transformer as vits
from losses import CLSTokenLoss, DINOLoss, KoLeoLoss, gram_loss, iBOTPatchLoss, sinkhorn_knopp, spd_loss


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Distillation', parents=[main_dino.get_args_parser(ema_teacher=False)],
                                     add_help=False)
    # DINOv2's distillation schedule of the teacher temperature
    parser.set_defaults(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)

    # Teacher
    parser.add_argument('--teacher_arch', default='vit_large_patch16_dinov3', type=str, help="""Teacher
        architecture: vit_small/base/large (ours, with --teacher_patch_size) or any timm ViT name, e.g.
        vit_large_patch16_dinov3 for Meta's DINOv3 checkpoints.""")
    parser.add_argument('--teacher_patch_size', default=16, type=int, help="Patch size of our ViT teachers.")
    parser.add_argument('--teacher_weights', default='', type=str, help="""Teacher weights (required): Meta's
        DINOv3 files, a checkpoint of main_dino.py or main_distill.py, an official DINO checkpoint.""")
    parser.add_argument('--teacher_checkpoint_key', default='teacher', type=str, help="""Key of the teacher
        network in a full checkpoint (main_dino.py: teacher; main_distill.py: student).""")
    parser.add_argument('--allow_random_teacher', default=False, type=utils.bool_flag, help="""Run with a
        randomly initialised teacher when no --teacher_weights are given (for tests only).""")

    # DINOv2's flags (main_dino.add_dinov2_args) with distillation's defaults: iBOT and KoLeo on, masks of 2x2
    # patches of 16 px, 40% of the patches of half the global crops
    parser.set_defaults(ibot_loss_weight=1.0, koleo_loss_weight=0.1, mask_ratio=[0.4], mask_patch_size=32)
    # Loss weights of the distillation terms
    parser.add_argument('--cls_loss_weight', default=1.0, type=float)
    parser.add_argument('--spd_loss_weight', default=1.0, type=float)
    parser.add_argument('--gram_loss_weight', default=0.0, type=float, help="DINOv3's Gram anchoring (MSE).")
    parser.add_argument('--spd_eps', default=1e-4, type=float,
                        help="Ridge added to the patch Gram matrices of the SPD loss (keeps them positive definite).")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not backbones.is_vit(args.arch):
        raise utils.UserError(f"--arch {args.arch}: the student must be one of our ViTs ({backbones.OUR_VITS}), "
                              "whose patches the iBOT loss masks; timm models (DINOv3's among them) take no mask: "
                              "they can be the teacher (docs/distillation.md)")
    main_dino.check_args(args)  # main_dino.check_dinov2_args too
    for name in ("cls", "spd", "gram"):
        if getattr(args, f"{name}_loss_weight") < 0:
            raise utils.UserError(f"--{name}_loss_weight must not be negative")
    if not args.teacher_weights and not args.allow_random_teacher:
        raise utils.UserError("--teacher_weights is required (a random teacher only with --allow_random_teacher "
                              "true, for tests)")
    if args.spd_eps <= 0:
        raise utils.UserError("--spd_eps must be positive")


# ----------------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------------
def resample_patch_tokens(tokens: torch.Tensor, grid: Tuple[int, int], target: Tuple[int, int]) -> torch.Tensor:
    """Patch tokens [B, h*w, D] on another grid (e.g. a /14 teacher for a /16 student), bilinearly."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    x = F.interpolate(x.float(), size=target, mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(2).transpose(1, 2).to(tokens.dtype)


def build_teacher(args: argparse.Namespace) -> Tuple[nn.Module, nn.Module, nn.Module, int, str]:
    """(backbone, DINO head, iBOT head, width, weights hash) of the frozen teacher."""
    torch.manual_seed(0)  # a random teacher (--allow_random_teacher) is the same in every process
    backbone, dim = backbones.build_backbone(args.teacher_arch, args.teacher_patch_size)
    if not hasattr(backbone, "patch_embed") or not hasattr(backbone, "forward_features"):
        raise utils.UserError(f"--teacher_arch {args.teacher_arch}: the teacher must be a ViT (its patch tokens "
                              "are distilled)")
    if args.teacher_weights:
        checkpointing.load_pretrained_weights(backbone, args.teacher_weights, args.teacher_checkpoint_key,
                                              args.teacher_arch, args.teacher_patch_size)
    else:
        print("WARNING: --allow_random_teacher: the teacher is RANDOMLY INITIALISED (seed 0); use this for tests only")
    heads = []
    for name, prefix in (("DINO", "head."), ("iBOT", "ibot_head.")):
        if name == "iBOT" and not args.ibot_separate_head:
            heads.append(heads[0])
            break
        # A fixed seed: the same random heads in every process and on every resume.
        torch.manual_seed(1 + len(heads))
        head = vits.DINOHead(dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer)
        if not (args.teacher_weights and checkpointing.load_head_weights(head, args.teacher_weights,
                                                                         args.teacher_checkpoint_key, prefix)):
            print(f"Teacher {name} head: initialised from a fixed seed and frozen (no fitting head in the checkpoint)")
        heads.append(head)
    weights_hash = checkpointing.state_dict_hash(nn.ModuleList([backbone, *heads]))
    teacher = nn.ModuleList([backbone, *heads]).to(args.device)
    teacher.eval().requires_grad_(False)
    return backbone, heads[0], heads[1], dim, weights_hash


# ----------------------------------------------------------------------------------------------------
# Student
# ----------------------------------------------------------------------------------------------------
class DistillStudent(nn.Module):
    """The trained modules, in one module so that one DDP wrapper synchronises them all: the backbone (with
    a mask token), the DINO head (`head`, as in MultiCropWrapper checkpoints), the iBOT head and the CLS-token
    loss with its projection. The backbone's weights stay under `backbone.*`, so eval_knn.py and
    eval_linear.py read them with `--checkpoint_key student`."""

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: Optional[nn.Module], cls_loss: CLSTokenLoss):
        super().__init__()
        self.backbone, self.head, self.ibot_head, self.cls_loss = backbone, head, ibot_head, cls_loss

    def forward(self, crops, masks: torch.Tensor, teacher_cls: torch.Tensor,
                mask_index: Optional[torch.Tensor] = None):
        """crops: [global1, global2, local1, ...] of [B, 3, H, W]; masks: [2B, N] of the global crops
        (crop-major); mask_index: the flat indices of its True entries, if known (no host sync). Returns (DINO
        logits of all crops [(2+L)B, K], iBOT logits of the masked patches [M, K], global CLS tokens [2B, D],
        global patch tokens [2B, N, D], patch grid, CLS-token loss)."""
        g_cls, g_patch, grid = ssl_meta_arch.tokens_and_grid(self.backbone, torch.cat(crops[:2]), masks)
        local = crops[2:]
        cls = [g_cls] + [self.backbone(torch.cat(local[start:end])) for start, end in utils.resolution_runs(local)]
        dino_logits = self.head(torch.cat(cls))
        ibot_logits = (self.ibot_head or self.head)(ssl_meta_arch.masked_rows(g_patch, masks, mask_index))
        return dino_logits, ibot_logits, g_cls, g_patch, grid, self.cls_loss(g_cls, teacher_cls)


def distill_step(student: nn.Module, teacher: Tuple[nn.Module, nn.Module, nn.Module], losses: dict,
                 args: argparse.Namespace):
    """Distillation's part of the shared loop: teacher forward (no gradient), student forward, five losses; the
    metrics carry the training-health signals (health.py) of the DINO loss and the student's CLS features."""
    t_backbone, t_head, t_ibot_head = teacher
    w = {name: getattr(args, f"{name}_loss_weight") for name in ("dino", "ibot", "koleo", "cls", "spd", "gram")}

    def step(batch, epoch: int, it: int):
        crops, masks, *rest = batch  # [crops, masks, mask_index] from main_dino.build_data's loader
        mask_index = rest[0] if rest else None
        masks = masks.transpose(0, 1).flatten(0, 1)  # [B, 2, N] -> [2B, N], crop-major like torch.cat(crops[:2])
        with torch.no_grad():
            t_cls, t_patch, t_grid = ssl_meta_arch.tokens_and_grid(t_backbone, torch.cat(crops[:2]))
        dino_logits, ibot_logits, s_cls, s_patch, s_grid, cls_loss = student(crops, masks, t_cls, mask_index)
        with torch.no_grad():
            t_patch = resample_patch_tokens(t_patch, t_grid, s_grid)
            t_dino = t_head(t_cls)
            t_ibot = t_ibot_head(ssl_meta_arch.masked_rows(t_patch, masks, mask_index))
        temp = losses["dino"].teacher_temp(epoch)
        t_logp = ssl_meta_arch.teacher_log_probs(losses["dino"], t_dino, temp)  # for the health signals
        terms = {"dino_loss": losses["dino"](dino_logits, t_dino, epoch)}
        if args.centering == "sinkhorn_knopp":
            probs = sinkhorn_knopp(t_ibot, losses["ibot"].teacher_temp(epoch))
            terms["ibot_loss"] = losses["ibot"](ibot_logits, None, masks, epoch, teacher_probs=probs,
                                                mask_index=mask_index)
        else:
            terms["ibot_loss"] = losses["ibot"](ibot_logits, t_ibot, masks, epoch, mask_index=mask_index)
        terms["koleo_loss"] = sum(losses["koleo"](c) for c in s_cls.chunk(2))
        terms["cls_loss"] = cls_loss
        if w["spd"] > 0:  # eigendecompositions: only when used (torch.linalg.eigh checks its convergence on the host:
            # one synchronisation per step that no flag avoids)
            terms["spd_loss"] = spd_loss(s_patch, t_patch, args.spd_eps)
        if w["gram"] > 0:
            terms["gram_loss"] = gram_loss(s_patch, t_patch)
        total = sum(w[name[:-len("_loss")]] * value for name, value in terms.items())
        logged = {k: v.detach() for k, v in terms.items()}
        logged["teacher_temp"] = temp
        logged.update(health.dino_signals(t_logp, terms["dino_loss"], s_cls))  # the student's features
        return total, logged

    return step


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def train_distill(args: argparse.Namespace) -> None:
    check_args(args)
    mask_sampler = main_dino.build_mask_sampler(args)
    runtime.setup_run(args, deterministic=args.deterministic)

    # ============ data ... ============
    dataset, data_loader = main_dino.build_data(args, mask_sampler)
    niter_per_ep = engine.steps_per_epoch(dataset, data_loader, args.grad_accum_steps)

    # ============ teacher and student ... ============
    t_backbone, t_head, t_ibot_head, t_dim, teacher_hash = build_teacher(args)
    utils.fix_random_seeds(args.seed + args.rank)  # the student's initialisation does not depend on the teacher's
    backbone, dim = backbones.build_backbone(args.arch, args.patch_size, args.drop_path_rate,
                                             **main_dino.vit_options(args, masks=True))
    head = vits.DINOHead(dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer)
    ibot_head = vits.DINOHead(dim, args.out_dim, use_bn=args.use_bn_in_head,
                              norm_last_layer=args.norm_last_layer) if args.ibot_separate_head else None
    if args.pretrained_weights and not engine.has_checkpoint(args.output_dir, args.pretrained_weights):
        checkpointing.init_from_pretrained(backbone, {"head.": head, "ibot_head.": ibot_head}, args.pretrained_weights,
                                           args.checkpoint_key, args.arch, args.patch_size)
    student = DistillStudent(backbone, head, ibot_head, CLSTokenLoss(dim, t_dim)).to(args.device)
    main_dino.speed_setup(args, student.backbone, t_backbone)
    if args.compile:
        ssl_meta_arch.compile_forward_features(student.backbone, t_backbone)
    # BN heads (--use_bn_in_head) normalise over the global batch, as in main_dino.py; the frozen teacher's heads
    # use their running statistics, which SyncBatchNorm would not change
    student, _ = engine.distribute(student, args.device)
    print(f"Teacher {args.teacher_arch} ({t_dim}) frozen; student {args.arch}/{args.patch_size} ({dim}).")

    # ============ losses, optimizer, schedules ... ============
    ncrops = args.local_crops_number + 2
    loss_fns = {
        "dino": DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, center_momentum=args.center_momentum,
                         centering=args.centering),
        "ibot": iBOTPatchLoss(args.out_dim, args.warmup_teacher_temp, args.teacher_temp,
                              args.warmup_teacher_temp_epochs, args.epochs),
        "koleo": KoLeoLoss(),
    }
    for fn in loss_fns.values():
        fn.to(args.device)
    # DINOv2's groups when its layer-wise decay or patch-embedding multiplier is asked for
    optimizer = main_dino.build_optimizer(args, student, dinov2_groups=args.layerwise_decay != 1
                                          or args.patch_embed_lr_mult != 1)
    precision = runtime.precision_setup(args.device, args.use_fp16, args.amp_dtype)
    print(f"Precision: {precision.description}.")
    lr_schedule, wd_schedule = main_dino.build_schedules(args, niter_per_ep)
    evaluate = eval_knn.online_knn_callback(args, engine.unwrap(student).backbone, precision.autocast, "student")
    evaluate = health.epoch_callback(args, dataset.base, engine.unwrap(student).backbone, precision.autocast, evaluate)

    def check_checkpoint(checkpoint: dict) -> None:
        saved = checkpoint.get("teacher_hash") if isinstance(checkpoint, dict) else None
        if saved is not None and saved != teacher_hash:
            raise utils.UserError(
                f"{os.path.join(args.output_dir, 'checkpoint.pth')} was trained with another teacher "
                f"({checkpoint.get('teacher_weights')!r}, weights hash {saved[:12]}) than --teacher_weights "
                f"{args.teacher_weights!r} (hash {teacher_hash[:12]}): use that teacher, or another --output_dir")

    print("Starting distillation !")
    engine.fit(args, step=distill_step(student, (t_backbone, t_head, t_ibot_head), loss_fns, args),
               student=student, optimizer=optimizer, data_loader=data_loader, lr_schedule=lr_schedule,
               wd_schedule=wd_schedule, precision=precision,
               state={"dino_loss": loss_fns["dino"], "ibot_loss": loss_fns["ibot"]}, evaluate=evaluate,
               extra_checkpoint={"teacher_weights": args.teacher_weights, "teacher_arch": args.teacher_arch,
                                 "teacher_hash": teacher_hash},
               check_checkpoint=check_checkpoint)


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Distillation', parents=[get_args_parser()])
    runtime.run_script(train_distill, parser.parse_args())
