# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Flags, defaults, loop and checkpoint format follow main_dino.py of facebookresearch/dino (Apache 2.0).
"""DINO pretraining: a student and an EMA teacher trained by self-distillation on multi-crop views.

    python main_dino.py --arch vit_small --data_path /path/to/imagenet/train --output_dir out   # 1 CPU/GPU
    torchrun --nproc_per_node=8 main_dino.py --arch vit_small --data_path ... --output_dir out  # 8 GPUs

Reads top to bottom: flags, data, models, loss and optimizer, schedules, resume, loop, save.
Restarting the same command resumes from `output_dir/checkpoint.pth`.

With --ibot_loss_weight and/or --koleo_loss_weight above 0 it trains DINOv2's objective instead (docs/training.md):
iBOT on masked patches of the global crops and KoLeo on the student's CLS beside DINO, DINOv2's optimizer groups
(--layerwise_decay, --patch_embed_lr_mult), per-iteration teacher temperature and square-root learning-rate
scaling. With neither, it is the official DINO: same defaults, numerics and checkpoints. With --gram_loss_weight above 0
(and DINOv2's objective) it adds DINOv3's Gram anchoring to a frozen Gram teacher (docs/training.md).
"""
import argparse
import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn

import augmentations
import backbones
import checkpointing
import data
import engine
import eval_knn
import gram_anchoring
import health
import masking
import runtime
import ssl_meta_arch
import tracking
import utils
import vision_transformer as vits
from losses import DINOLoss, GramLoss, KoLeoLoss, iBOTPatchLoss


def get_args_parser(ema_teacher: bool = True) -> argparse.ArgumentParser:
    """The official flags and ours (details in docs/training.md). `ema_teacher=False` leaves out
    --momentum_teacher (main_distill.py's teacher is frozen)."""
    parser = argparse.ArgumentParser('DINO', add_help=False)

    # Model parameters
    backbones.add_model_args(parser, images=False)  # --arch, --patch_size, --pretrained_weights, --checkpoint_key
    parser.add_argument('--out_dim', default=65536, type=int, help="""Dimensionality of the DINO head output.
        For complex and large datasets large values (like 65k) work well.""")
    parser.add_argument('--norm_last_layer', default=True, type=utils.bool_flag, help="""Whether or not to
        weight normalize the last layer of the DINO head. Not normalizing leads to better performance but can make
        the training unstable.""")
    if ema_teacher:
        parser.add_argument('--momentum_teacher', default=0.996, type=float, help="""Base EMA parameter for
            teacher update. The value is increased to 1 during training with cosine schedule.""")
    parser.add_argument('--use_bn_in_head', default=False, type=utils.bool_flag,
                        help="Whether to use batch normalizations in projection head (Default: False)")

    # Temperature teacher parameters
    parser.add_argument('--warmup_teacher_temp', default=0.04, type=float,
                        help="Initial value for the teacher temperature: 0.04 works well in most cases.")
    parser.add_argument('--teacher_temp', default=0.04, type=float, help="""Final value (after linear warmup)
        of the teacher temperature. For most experiments, anything above 0.07 is unstable.""")
    parser.add_argument('--warmup_teacher_temp_epochs', default=0, type=int,
                        help='Number of warmup epochs for the teacher temperature (Default: 0).')
    parser.add_argument('--center_momentum', default=0.9, type=float,
                        help="EMA momentum of the teacher's centre (1.0: no centring).")

    # Training/Optimization parameters
    runtime.add_precision_args(parser)  # --use_fp16, --amp_dtype
    parser.add_argument('--weight_decay', type=float, default=0.04, help="""Initial value of the weight
        decay. With ViT, a smaller value at the beginning of training works well.""")
    parser.add_argument('--weight_decay_end', type=float, default=0.4,
                        help="Final value of the weight decay (cosine schedule).")
    parser.add_argument('--clip_grad', type=float, default=3.0,
                        help="Maximal gradient norm of each parameter (clipping); 0 for disabling.")
    parser.add_argument('--batch_size_per_gpu', default=64, type=int,
                        help='Per-GPU batch-size : number of distinct images loaded on one GPU.')
    parser.add_argument('--grad_accum_steps', default=1, type=int,
                        help="Batches per optimizer step (effective batch: batch_size_per_gpu x processes x this).")
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument('--freeze_last_layer', default=1, type=int, help="""Number of epochs during which we
        keep the output layer fixed. Try increasing this value if the loss does not decrease.""")
    parser.add_argument("--lr", default=0.0005, type=float, help="""Learning rate at the end of linear warmup,
        for a reference batch size of 256 (linearly scaled with the batch size).""")
    parser.add_argument("--warmup_epochs", default=10, type=int,
                        help="Number of epochs for the linear learning-rate warm up.")
    parser.add_argument('--min_lr', type=float, default=1e-6, help="Target LR at the end of optimization (cosine).")
    parser.add_argument('--optimizer', default='adamw', type=str, choices=['adamw', 'sgd', 'lars'],
                        help="""Type of optimizer. We recommend using adamw with ViTs.""")
    parser.add_argument('--drop_path_rate', type=float, default=0.1, help="stochastic depth rate")
    parser.add_argument('--freeze_backbone_epochs', default=0, type=int, help="""With --pretrained_weights:
        train only the heads for this many epochs, so that fresh heads settle before they reach the backbone.""")
    parser.add_argument('--backbone_lr_scale', default=1.0, type=float,
                        help="The backbone's learning rate as a fraction of the heads' (--lr).")
    add_dinov2_args(parser)
    if ema_teacher:  # main_distill.py has its own Gram loss, to its frozen teacher
        gram_anchoring.add_args(parser)

    # Multi-crop parameters
    parser.add_argument('--global_crops_scale', type=float, nargs='+', default=(0.4, 1.), help="""Scale range
        of the cropped image before resizing, relatively to the origin image. Used for large global view cropping.
        When disabling multi-crop (--local_crops_number 0), we recommend a wider range ("0.14 1.").""")
    parser.add_argument('--local_crops_number', type=int, default=8, help="""Number of small local views to
        generate. Set this parameter to 0 to disable multi-crop training.""")
    parser.add_argument('--local_crops_scale', type=float, nargs='+', default=(0.05, 0.4), help="""Scale range
        of the cropped image before resizing, relatively to the origin image. Used for small local view cropping.""")
    parser.add_argument('--global_crops_size', type=int, default=224, help="Side of the global crops (pixels).")
    parser.add_argument('--local_crops_size', type=int, default=96, help="Side of the local crops (pixels).")

    # Misc
    parser.add_argument('--data_path', default='/path/to/imagenet/train/', type=str, help="""Training images:
        a folder (any depth, labels not needed), an ImageFolder tree, a list file, several of these (commas or a
        glob), a packed .npz, or 'synthetic' (docs/data.md).""")
    parser.add_argument('--data_layout', default='auto', choices=data.LAYOUTS,
                        help="How to read --data_path (auto: detected, one line says what was found).")
    parser.add_argument('--output_dir', default=".", type=str, help='Path to save logs and checkpoints.')
    parser.add_argument('--saveckp_freq', default=20, type=int, help='Save checkpoint every x epochs.')
    engine.add_checkpoint_args(parser)  # --saveckp_every_iters
    parser.add_argument('--compile', type=utils.bool_flag, default=False,
                        help="torch.compile the backbones (one graph per crop size; a C++ compiler on CPU).")
    parser.add_argument('--grad_checkpointing', type=utils.bool_flag, default=False,
                        help="Activation checkpointing in the ViT blocks: less memory, about 30%% more compute.")
    parser.add_argument('--skip_nonfinite', default=0, type=int, help="""Skip up to N steps whose loss or
        gradients are not finite (0: the first one stops training, the last good checkpoint kept).""")
    parser.add_argument('--seed', default=0, type=int, help='Random seed.')
    parser.add_argument('--deterministic', type=utils.bool_flag, default=False,
                        help="Deterministic GPU kernels, for bitwise-equal reruns; slower (docs/reliability.md).")
    eval_knn.add_online_knn_args(parser)
    parser.add_argument('--num_workers', default=None, type=int,
                        help='Number of data loading workers per GPU (default: min(10, CPUs per process)).')
    parser.add_argument('--max_bad_images_fraction', default=0.01, type=float,
                        help="Unreadable images are skipped and reported; above this fraction the run stops.")
    parser.add_argument('--print_freq', default=10, type=int, help='Print progress every x iterations.')
    tracking.add_tracking_args(parser)
    health.add_health_args(parser)
    utils.add_distributed_args(parser)
    return parser


def add_dinov2_args(parser: argparse.ArgumentParser) -> None:
    """The flags of DINOv2's objective (iBOT, KoLeo, masks, its optimizer and ViT options), off by default here;
    main_distill.py sets its own defaults for them."""
    group = parser.add_argument_group("DINOv2 objective (on when --ibot_loss_weight or --koleo_loss_weight > 0)")
    group.add_argument('--dino_loss_weight', default=1.0, type=float, help="Weight of the DINO (CLS) loss.")
    group.add_argument('--ibot_loss_weight', default=0.0, type=float, help="""Weight of the iBOT loss on the
        masked patches of the global crops (DINOv2: 1.0; 0: no iBOT, no masks).""")
    group.add_argument('--koleo_loss_weight', default=0.0, type=float,
                       help="Weight of KoLeo on the student's global CLS tokens (DINOv2: 0.1).")
    group.add_argument('--ibot_separate_head', default=False, type=utils.bool_flag, help="""A separate iBOT
        head (else the DINO head also projects the patch tokens, DINOv2's default).""")
    group.add_argument('--centering', default='centering', choices=DINOLoss.CENTERINGS, help="""Teacher targets of
        the DINO and iBOT losses: centred softmax (DINO) or Sinkhorn-Knopp (DINOv2's alternative).""")
    group.add_argument('--mask_ratio', default=[0.1, 0.5], type=float, nargs='+', help="""Fraction of the patches
        of a masked global crop that are masked: one value, or a range `min max` drawn per crop (DINOv2: 0.1 0.5).""")
    group.add_argument('--mask_probability', default=0.5, type=float,
                       help="Fraction of the global crops that get a mask (DINOv2: 0.5).")
    group.add_argument('--mask_patch_size', default=None, type=int, help="""Side in pixels of the mask cells, a
        multiple of the patch size (default: the patch size, DINOv2's per-patch masking).""")
    group.add_argument('--layerwise_decay', default=1.0, type=float, help="""Layer-wise learning-rate decay: block
        i of L gets decay^(L - i), tokens and patch embedding decay^(L + 1) (DINOv2: 0.9; 1: none).""")
    group.add_argument('--patch_embed_lr_mult', default=1.0, type=float,
                       help="Learning-rate multiplier of the patch embedding (DINOv2: 0.2).")
    group.add_argument('--drop_path_uniform', default=False, type=utils.bool_flag, help="""The same drop-path rate
        in every block (DINOv2) instead of a rate rising linearly with depth (DINO). Our ViTs.""")
    group.add_argument('--layerscale', default=None, type=float, help="""LayerScale's initial value (DINOv2:
        1e-5; default: none, or the value of a dinov2_* --arch). Our ViTs.""")
    group.add_argument('--num_register_tokens', default=0, type=int,
                       help="Register tokens of the ViT (DINOv2 with registers: 4). Our ViTs.")


def dinov2_objective(args: argparse.Namespace) -> bool:
    """Whether main_dino.py trains DINOv2's objective (iBOT and/or KoLeo) rather than the official DINO."""
    return args.ibot_loss_weight > 0 or args.koleo_loss_weight > 0


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values and combinations that cannot work, with one message each."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise utils.UserError(message)

    for name in ("global_crops_scale", "local_crops_scale"):
        value = getattr(args, name)
        require(len(value) == 2 and 0 < value[0] <= value[1] <= 1,
                f"--{name} takes two numbers 0 < min <= max <= 1, got {' '.join(map(str, value))}")
    for name in ("batch_size_per_gpu", "epochs", "grad_accum_steps", "out_dim", "global_crops_size",
                 "local_crops_size", "patch_size", "print_freq"):
        require(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("local_crops_number", "warmup_epochs", "freeze_last_layer", "warmup_teacher_temp_epochs",
                 "saveckp_freq", "saveckp_every_iters", "skip_nonfinite", "lr", "min_lr", "clip_grad", "drop_path_rate",
                 "freeze_backbone_epochs"):
        require(getattr(args, name) >= 0, f"--{name} must not be negative, got {getattr(args, name)}")
    require(args.freeze_backbone_epochs < max(args.epochs, 1), f"--freeze_backbone_epochs "
            f"{args.freeze_backbone_epochs} leaves no epoch of the {args.epochs} in which the backbone trains")
    require(not args.freeze_backbone_epochs or bool(args.pretrained_weights),
            "--freeze_backbone_epochs trains the heads over a frozen backbone: it needs --pretrained_weights")
    require(args.backbone_lr_scale >= 0, f"--backbone_lr_scale must not be negative, got {args.backbone_lr_scale}")
    require(0 <= args.center_momentum <= 1, f"--center_momentum must be in [0, 1], got {args.center_momentum}")
    require(not args.knn_eval_at_start or bool(args.knn_data_path),
            "--knn_eval_at_start needs --knn_data_path (the labelled images of the online k-NN)")
    require(args.knn_eval_freq >= 1, f"--knn_eval_freq must be at least 1, got {args.knn_eval_freq}")
    require(args.num_workers is None or args.num_workers >= 0, "--num_workers must not be negative")
    if hasattr(args, "momentum_teacher"):  # main_distill.py's teacher is frozen: no EMA
        require(0 <= args.momentum_teacher <= 1, f"--momentum_teacher must be in [0, 1], got {args.momentum_teacher}")
    require(0 <= args.max_bad_images_fraction <= 1, "--max_bad_images_fraction must be in [0, 1]")
    for name in ("teacher_temp", "warmup_teacher_temp"):
        # The teacher must be sharper than the student (temperature 0.1): above, nothing prevents collapse.
        require(0 < getattr(args, name) <= 0.1, f"--{name} must be in (0, 0.1] (the student's temperature is "
                f"0.1; DINO uses 0.04-0.07), got {getattr(args, name)}")
    tracking.check_args(args)
    health.check_args(args)
    check_dinov2_args(args)
    gram_anchoring.check_args(args, dinov2_objective(args))
    if backbones.is_vit(args.arch):
        patch_size = backbones.patch_size_of(args.arch, args.patch_size)
        what = f"--patch_size {patch_size}" if patch_size == args.patch_size else f"the patch size of {args.arch}, {patch_size}"
        for name in ("global_crops_size", "local_crops_size"):
            require(getattr(args, name) % patch_size == 0,
                    f"--{name} {getattr(args, name)} is not a multiple of {what}")


def check_dinov2_args(args: argparse.Namespace) -> None:
    """The flags of DINOv2's objective (also main_distill.py's): values, and what they need of the backbone."""
    for name in ("dino", "ibot", "koleo"):
        if getattr(args, f"{name}_loss_weight") < 0:
            raise utils.UserError(f"--{name}_loss_weight must not be negative")
    vit_only = {"--drop_path_uniform true": args.drop_path_uniform, "--layerscale": args.layerscale is not None,
                "--num_register_tokens": args.num_register_tokens != 0}
    if args.ibot_loss_weight > 0:
        vit_only[f"--ibot_loss_weight {args.ibot_loss_weight}"] = True
    for flag, given in vit_only.items():
        if given and not backbones.is_vit(args.arch):
            raise utils.UserError(
                f"{flag}: --arch {args.arch} is not one of our ViTs ({backbones.OUR_VITS})"
                + (", the only backbones that take iBOT masks (a mask token in place of masked patches); ResNets "
                   "and timm models cannot mask their input. Use a ViT, or drop iBOT (--ibot_loss_weight 0; "
                   "KoLeo works with any backbone)" if flag.startswith("--ibot") else ""))
    if args.num_register_tokens < 0 or (args.layerscale is not None and args.layerscale <= 0):
        raise utils.UserError("--num_register_tokens must not be negative and --layerscale must be positive")
    if not 0 < args.layerwise_decay <= 1 or args.patch_embed_lr_mult < 0:
        raise utils.UserError(f"--layerwise_decay must be in (0, 1] (got {args.layerwise_decay}) and "
                              f"--patch_embed_lr_mult not negative (got {args.patch_embed_lr_mult})")
    if not hasattr(args, "momentum_teacher"):
        return  # main_distill.py: its own objective
    if not dinov2_objective(args):
        for flag, changed in {"--layerwise_decay": args.layerwise_decay != 1, "--ibot_separate_head":
                              args.ibot_separate_head, "--patch_embed_lr_mult": args.patch_embed_lr_mult != 1}.items():
            if changed:
                raise utils.UserError(f"{flag} belongs to DINOv2's objective: switch it on with --ibot_loss_weight "
                                      "1 and/or --koleo_loss_weight 0.1, or leave the flag at its default")
        return
    if args.koleo_loss_weight > 0 and args.batch_size_per_gpu < 2:
        raise utils.UserError("--koleo_loss_weight needs --batch_size_per_gpu of at least 2 (each image's nearest "
                              "neighbour in the batch)")
    if args.ibot_loss_weight > 0 and args.ibot_separate_head and args.use_bn_in_head:
        raise utils.UserError("--ibot_separate_head true with --use_bn_in_head true: a batch without masked patches "
                              "would leave the iBOT head's batch norm nothing to normalise; share the head "
                              "(--ibot_separate_head false) or drop the batch norm")


def build_mask_sampler(args: argparse.Namespace) -> masking.BlockMaskSampler:
    """The iBOT masks of the global crops, from --mask_ratio, --mask_probability and --mask_patch_size; mask
    settings that mask no patch, or every patch, stop here with the flag to change."""
    patch_size = backbones.patch_size_of(args.arch, args.patch_size)
    try:
        sampler = masking.BlockMaskSampler(args.global_crops_size, patch_size, args.mask_patch_size,
                                           mask_ratio=args.mask_ratio, mask_probability=args.mask_probability)
    except ValueError as e:  # a flag out of range: the message names it
        raise utils.UserError(str(e)) from None
    high, cells = sampler.mask_ratio[1], sampler.num_cells
    if args.mask_probability == 0 or sampler.num_masked_cells(high) == 0:
        raise utils.UserError(
            f"--mask_probability {args.mask_probability} with --mask_ratio {' '.join(map(str, args.mask_ratio))} "
            f"masks no patch of a {args.global_crops_size} px global crop ({cells} mask cells): the iBOT loss would "
            "have nothing to learn from. DINOv2 uses --mask_probability 0.5 --mask_ratio 0.1 0.5")
    if sampler.num_masked_cells(high) >= cells:
        raise utils.UserError(
            f"--mask_ratio {' '.join(map(str, args.mask_ratio))} masks every patch of some global crops ({cells} "
            "mask cells): the student would see only mask tokens. Keep the ratio below 1, e.g. DINOv2's 0.1 0.5")
    print(f"iBOT masks: {sampler}")
    return sampler


def build_data(args: argparse.Namespace, mask_sampler: Optional[masking.BlockMaskSampler] = None):
    """The multi-crop dataset and its loader (seeded per sample, sharded over processes). With `mask_sampler`
    a sample is `((crops, masks [2, N]), label, bad)`: iBOT masks of the two global crops."""
    transform = augmentations.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                                   args.local_crops_number, args.global_crops_size,
                                                   args.local_crops_size, gram_anchoring.larger_crops_size(args))
    if mask_sampler is not None:
        transform = masking.MaskedCrops(transform, mask_sampler)
    dataset = data.PretrainDataset(data.build_dataset(args.data_path, layout=args.data_layout,
                                                     cache_dir=args.output_dir), transform, seed=args.seed)
    data_loader = data.build_loader(dataset, args.batch_size_per_gpu, args.num_workers, args.seed, args.rank,
                                    args.world_size, pin_memory=args.device.type == "cuda",
                                    low_priority_workers=args.device.type == "cpu",
                                    collate_fn=masking.collate_masked_crops if mask_sampler is not None else None)
    return dataset, data_loader


def build_optimizer(args: argparse.Namespace, student: nn.Module, dinov2_groups: bool = False
                    ) -> torch.optim.Optimizer:
    """--optimizer over the student's parameters (no weight decay on biases and norms); lr and weight decay
    are set by the schedules at every step. With --backbone_lr_scale other than 1, the heads' groups come
    first (group 0's lr is the one logged) and the backbone's carry `lr_scale`. `dinov2_groups`: DINOv2's
    groups instead (ssl_meta_arch.params_groups_with_decay: layer-wise decay, patch-embedding multiplier)."""
    params_groups = utils.get_params_groups(student)
    scale = args.backbone_lr_scale
    if dinov2_groups:
        params_groups = ssl_meta_arch.params_groups_with_decay(engine.unwrap(student), args.layerwise_decay,
                                                               args.patch_embed_lr_mult, scale)
    elif scale != 1.0:
        backbone = {id(p) for p in engine.unwrap(student).backbone.parameters()}
        params_groups = [{**group, "params": [p for p in group["params"] if (id(p) in backbone) == in_backbone],
                          "regularized": i == 0, "lr_scale": scale if in_backbone else 1.0}
                         for in_backbone in (False, True) for i, group in enumerate(params_groups)]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params_groups, fused=True)  # to use with ViTs
    if args.optimizer == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by scheduler
    import timm.optim
    return timm.optim.Lars(params_groups, lr=0, momentum=0.9)  # to use with convnet and large batches


def build_schedules(args: argparse.Namespace, niter_per_ep: int, sqrt_scaling: bool = False):
    """Per-iteration learning rate (linear warmup, cosine decay) and weight decay (cosine) schedules. --lr is
    scaled with the total batch: linearly from 256 (DINO), or with `sqrt_scaling` by the square root from 1,024
    (DINOv2's rule); the value in use is printed."""
    total_batch = args.batch_size_per_gpu * args.world_size * args.grad_accum_steps
    if sqrt_scaling:
        lr, rule = args.lr * math.sqrt(total_batch / 1024.), f"sqrt({total_batch}/1024), DINOv2's rule"
    else:
        lr, rule = args.lr * total_batch / 256., f"{total_batch}/256, the linear scaling rule"
    print(f"Learning rate after warm-up: {lr:.6g} (--lr {args.lr:g} x {rule}).")
    lr_schedule = utils.cosine_scheduler(
        lr,
        args.min_lr,
        args.epochs, niter_per_ep,
        warmup_epochs=args.warmup_epochs,
    )
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep)
    return lr_schedule, wd_schedule


def speed_setup(args: argparse.Namespace, student_backbone: nn.Module, teacher_backbone: nn.Module) -> None:
    """--grad_checkpointing (student), channels-last convnets on GPU and --compile, applied in place to the
    backbones (state_dict keys unchanged). Shared with main_distill.py."""
    if args.grad_checkpointing:
        if not hasattr(student_backbone, "set_grad_checkpointing"):
            raise utils.UserError(f"--grad_checkpointing: {args.arch} does not support activation checkpointing")
        student_backbone.set_grad_checkpointing(True)
    for backbone in (student_backbone, teacher_backbone):
        if args.device.type == "cuda" and not isinstance(backbone, vits.VisionTransformer) and \
                any(isinstance(m, nn.Conv2d) for m in backbone.modules()):
            # tensor-core convolutions run in NHWC; the weights' layout makes the convolutions pick it
            backbone.to(memory_format=torch.channels_last)
        if args.compile:
            # One graph per crop resolution (2 with multi-crop), each compiled once; in place, so that
            # checkpoints keep their keys.
            backbone.compile(dynamic=False)
    if args.compile:
        print("torch.compile: the first iterations at each crop resolution compile (can take minutes).")


def vit_options(args: argparse.Namespace, masks: bool = False) -> dict:
    """Keyword arguments of our ViTs from the DINOv2 flags: only those given, so that the official build is
    untouched otherwise; `masks` adds iBOT's mask token."""
    options = {"masked_im_modeling": True} if masks else {}
    if args.drop_path_uniform:
        options["drop_path_uniform"] = True
    if args.layerscale is not None:
        options["init_values"] = args.layerscale
    if args.num_register_tokens:
        options["num_register_tokens"] = args.num_register_tokens
    return options


def build_networks(args: argparse.Namespace, dinov2: bool):
    """(student, teacher) before placement: MultiCropWrapper(backbone, DINOHead), officially; with DINOv2's
    objective, ssl_meta_arch.SSLModel (a mask token in the ViT, an iBOT head when --ibot_separate_head)."""
    ibot = dinov2 and args.ibot_loss_weight > 0
    options = vit_options(args, masks=ibot)
    student, embed_dim = backbones.build_backbone(args.arch, args.patch_size, args.drop_path_rate, **options)
    teacher, _ = backbones.build_backbone(args.arch, args.patch_size, **options)

    def head(norm_last_layer: bool = args.norm_last_layer) -> nn.Module:
        return vits.DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=norm_last_layer)

    separate = ibot and args.ibot_separate_head
    if dinov2:
        student = ssl_meta_arch.SSLModel(student, head(), head() if separate else None)
        heads = {"head.": student.head, "ibot_head.": student.ibot_head}
    else:
        student = utils.MultiCropWrapper(student, head())
        heads = {"head.": student.head}
    if args.pretrained_weights and not engine.has_checkpoint(args.output_dir, args.pretrained_weights):
        checkpointing.init_from_pretrained(student.backbone, heads, args.pretrained_weights, args.checkpoint_key,
                                           args.arch, args.patch_size)
    if dinov2:
        teacher = ssl_meta_arch.SSLModel(teacher, head(True), head(True) if separate else None)
    else:
        teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    return student, teacher


def build_training(args: argparse.Namespace, niter_per_ep: int) -> SimpleNamespace:
    """Student, teacher, losses, optimizer, precision and schedules, as the training loop uses them; with
    DINOv2's objective (`dinov2_objective`), its losses, optimizer groups and teacher-temperature schedule."""
    dinov2 = dinov2_objective(args)
    # ============ building student and teacher networks ... ============
    student, teacher = build_networks(args, dinov2)
    student, teacher = student.to(args.device), teacher.to(args.device)
    gram = gram_anchoring.build_gram_teacher(args, student.backbone, niter_per_ep) if args.gram_loss_weight else None
    if not backbones.is_vit(args.arch):  # ours are checked by check_args; a convnet's limit shows in a forward
        sizes = {"--global_crops_size": args.global_crops_size, "--local_crops_size": args.local_crops_size}
        backbones.check_input_sizes(student.backbone, sizes, args.arch)
        if runtime.cpu_bf16(args.device, args.use_fp16, args.amp_dtype):
            backbones.check_cpu_bf16_convolutions(student.backbone, sizes, args.arch)
    speed_setup(args, student.backbone, teacher.backbone)
    if args.compile and dinov2 and (args.ibot_loss_weight > 0 or gram is not None):
        ssl_meta_arch.compile_forward_features(student.backbone, teacher.backbone,
                                               *([gram.backbone] if gram is not None else []))

    student, teacher = engine.distribute(student, args.device, teacher)  # SyncBatchNorm and DDP, if several processes
    teacher_without_ddp = engine.unwrap(teacher)
    # teacher and student start with the same weights
    teacher_without_ddp.load_state_dict(engine.unwrap(student).state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    print(f"Student and Teacher are built: they are both {args.arch} network.")

    # ============ preparing loss ... ============
    dino_loss = DINOLoss(
        args.out_dim,
        args.local_crops_number + 2,  # total number of crops = 2 global crops + local_crops_number
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
        center_momentum=args.center_momentum,
        centering=args.centering,
    ).to(args.device)
    losses = {"dino": dino_loss}
    if dinov2 and args.ibot_loss_weight > 0:
        losses["ibot"] = iBOTPatchLoss(args.out_dim, args.warmup_teacher_temp, args.teacher_temp,
                                       args.warmup_teacher_temp_epochs, args.epochs,
                                       center_momentum=args.center_momentum).to(args.device)
    if dinov2 and args.koleo_loss_weight > 0:
        losses["koleo"] = KoLeoLoss()
    if gram is not None:
        losses["gram"] = GramLoss(img_level=args.gram_img_level)

    optimizer = build_optimizer(args, student, dinov2_groups=dinov2)
    precision = runtime.precision_setup(args.device, args.use_fp16, args.amp_dtype)
    print(f"Precision: {precision.description}.")
    lr_schedule, wd_schedule = build_schedules(args, niter_per_ep, sqrt_scaling=dinov2)
    # momentum parameter is increased to 1. during training with a cosine schedule
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep)
    teacher_temp_schedule = None
    if dinov2:  # DINOv2 warms the teacher temperature up per iteration (DINO per epoch, in DINOLoss)
        teacher_temp_schedule = ssl_meta_arch.teacher_temp_schedule(
            args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs * niter_per_ep,
            args.epochs * niter_per_ep)
        print(f"DINOv2 objective: DINO x {args.dino_loss_weight:g}, iBOT x {args.ibot_loss_weight:g}, KoLeo x "
              f"{args.koleo_loss_weight:g}; {args.centering}; last layer frozen by a learning rate of 0 for "
              f"{args.freeze_last_layer} epoch(s); gradients clipped per module.")
    if args.freeze_backbone_epochs:
        print(f"Backbone frozen in student and teacher for {args.freeze_backbone_epochs} epoch(s): heads only.")
    print("Loss, optimizer and schedulers ready.")
    return SimpleNamespace(student=student, teacher=teacher, teacher_without_ddp=teacher_without_ddp,
                           dino_loss=dino_loss, losses=losses, optimizer=optimizer, precision=precision,
                           lr_schedule=lr_schedule, wd_schedule=wd_schedule, momentum_schedule=momentum_schedule,
                           teacher_temp_schedule=teacher_temp_schedule, dinov2=dinov2, gram=gram)


def train_dino(args: argparse.Namespace) -> None:
    check_args(args)
    mask_sampler = build_mask_sampler(args) if dinov2_objective(args) and args.ibot_loss_weight > 0 else None
    runtime.setup_run(args, deterministic=args.deterministic)

    # ============ preparing data ... ============
    dataset, data_loader = build_data(args, mask_sampler)
    niter_per_ep = engine.steps_per_epoch(dataset, data_loader, args.grad_accum_steps)

    run = build_training(args, niter_per_ep)
    teacher_backbone, autocast = run.teacher_without_ddp.backbone, run.precision.autocast
    evaluate = eval_knn.online_knn_callback(args, teacher_backbone, autocast, "teacher")
    evaluate = health.epoch_callback(args, dataset.base, teacher_backbone, autocast, evaluate)
    step, after_step, clip_gradients = build_step(args, run, niter_per_ep)
    print("Starting DINO training !")
    engine.fit(args, step=step, student=run.student, optimizer=run.optimizer, data_loader=data_loader,
               lr_schedule=run.lr_schedule, wd_schedule=run.wd_schedule, precision=run.precision,
               state={"teacher": run.teacher, **{f"{name}_loss": loss for name, loss in run.losses.items()
                                                 if name not in ("koleo", "gram")},
                      "gram_teacher": run.gram},
               after_step=after_step, evaluate=evaluate, clip_gradients=clip_gradients,
               extra_checkpoint={"gram_teacher_source": run.gram.source} if run.gram is not None else None,
               check_checkpoint=gram_anchoring.resume_check(args, run.gram))


def build_step(args: argparse.Namespace, run: SimpleNamespace, niter_per_ep: int):
    """(step, after_step, clip_gradients) of the shared loop for `run` (build_training's): DINO's step and the
    official per-parameter clipping, or DINOv2's step and per-module clipping; the teacher EMA either way."""
    after_step = ema_update(run.student, run.teacher_without_ddp, run.momentum_schedule,
                            args.freeze_backbone_epochs * niter_per_ep)
    if not run.dinov2:
        return (dino_step(run.student, run.teacher, run.teacher_without_ddp, run.dino_loss), after_step,
                utils.clip_gradients)
    weights = {f"{name}_loss": getattr(args, f"{name}_loss_weight") for name in run.losses}
    if run.gram is not None and run.gram.refresh_after:
        after_step = gram_anchoring.with_refresh(after_step, run.gram, run.teacher_without_ddp.backbone)
    return (ssl_meta_arch.dinov2_step(run.student, run.teacher, run.losses, weights, run.teacher_temp_schedule,
                                      run.gram),
            after_step,
            ssl_meta_arch.clip_gradients_per_module)


def dino_step(student: nn.Module, teacher: nn.Module, teacher_without_ddp: nn.Module, dino_loss: DINOLoss):
    """DINO's part of the shared loop: teacher on the 2 global crops, student on all, DINO loss. The step's metrics
    carry the training-health signals (health.py) of the teacher's distribution and backbone CLS features."""
    teacher_features = health.InputCatcher(teacher_without_ddp.head)  # the teacher backbone's CLS features

    def step(images, epoch: int, it: int):
        with torch.no_grad():
            teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
        student_output = student(images)
        temp = dino_loss.teacher_temp(epoch)
        teacher_logp = ssl_meta_arch.teacher_log_probs(dino_loss, teacher_output, temp)  # centre before its update
        loss = dino_loss(student_output, teacher_output, epoch)
        signals = health.dino_signals(teacher_logp, loss, teacher_features.pop())
        return loss, {"teacher_temp": temp, **signals}

    return step


def ema_update(student: nn.Module, teacher_without_ddp: nn.Module, momentum_schedule, frozen_backbone_iters: int = 0):
    """`after_step` of the shared loop: the teacher EMA, over every parameter (DINO's and DINOv2's), or of the
    heads only during the first `frozen_backbone_iters` iterations, so that a frozen backbone stays bit for bit
    what it was."""
    student_named = dict(engine.unwrap(student).named_parameters())
    teacher_named = dict(teacher_without_ddp.named_parameters())
    student_params, teacher_params = list(student_named.values()), list(teacher_named.values())
    heads = [n for n in teacher_named if not n.startswith("backbone.")]
    student_heads, teacher_heads = [student_named[n] for n in heads], [teacher_named[n] for n in heads]

    def after_step(it: int):
        with torch.no_grad():
            m = float(momentum_schedule[it])  # momentum parameter
            frozen = it < frozen_backbone_iters
            torch._foreach_mul_(teacher_heads if frozen else teacher_params, m)
            torch._foreach_add_(teacher_heads if frozen else teacher_params,
                                student_heads if frozen else student_params, alpha=1 - m)
        return {"teacher_momentum": m}

    return after_step


if __name__ == '__main__':
    parser = argparse.ArgumentParser('DINO', parents=[get_args_parser()])
    args = parser.parse_args()
    runtime.run_script(train_dino, args)
