# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Flags, defaults, loop and checkpoint format follow main_dino.py of facebookresearch/dino (Apache 2.0).
"""DINO pretraining: a student and an EMA teacher trained by self-distillation on multi-crop views.

    python main_dino.py --arch vit_small --data_path /path/to/imagenet/train --output_dir out   # 1 CPU/GPU
    torchrun --nproc_per_node=8 main_dino.py --arch vit_small --data_path ... --output_dir out  # 8 GPUs

Reads top to bottom: flags, data, models, loss and optimizer, schedules, resume, loop, save.
Restarting the same command resumes from `output_dir/checkpoint.pth`.
"""
import argparse
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
import health
import masking
import runtime
import tracking
import utils
import vision_transformer as vits
from losses import DINOLoss


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
    if backbones.is_vit(args.arch):
        patch_size = backbones.patch_size_of(args.arch, args.patch_size)
        what = f"--patch_size {patch_size}" if patch_size == args.patch_size else f"the patch size of {args.arch}, {patch_size}"
        for name in ("global_crops_size", "local_crops_size"):
            require(getattr(args, name) % patch_size == 0,
                    f"--{name} {getattr(args, name)} is not a multiple of {what}")


def build_data(args: argparse.Namespace, mask_sampler: Optional[masking.BlockMaskSampler] = None):
    """The multi-crop dataset and its loader (seeded per sample, sharded over processes). With `mask_sampler`
    a sample is `((crops, masks [2, N]), label, bad)`: iBOT masks of the two global crops."""
    transform = augmentations.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale,
                                                   args.local_crops_number, args.global_crops_size,
                                                   args.local_crops_size)
    if mask_sampler is not None:
        transform = masking.MaskedCrops(transform, mask_sampler)
    dataset = data.PretrainDataset(data.build_dataset(args.data_path, layout=args.data_layout,
                                                     cache_dir=args.output_dir), transform, seed=args.seed)
    data_loader = data.build_loader(dataset, args.batch_size_per_gpu, args.num_workers, args.seed, args.rank,
                                    args.world_size, pin_memory=args.device.type == "cuda",
                                    low_priority_workers=args.device.type == "cpu",
                                    collate_fn=masking.collate_masked_crops if mask_sampler is not None else None)
    return dataset, data_loader


def build_optimizer(args: argparse.Namespace, student: nn.Module) -> torch.optim.Optimizer:
    """--optimizer over the student's parameters (no weight decay on biases and norms); lr and weight decay
    are set by the schedules at every step. With --backbone_lr_scale other than 1, the heads' groups come
    first (group 0's lr is the one logged) and the backbone's carry `lr_scale`."""
    params_groups = utils.get_params_groups(student)
    scale = args.backbone_lr_scale
    if scale != 1.0:
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


def build_schedules(args: argparse.Namespace, niter_per_ep: int):
    """Per-iteration learning rate (linear warmup, cosine decay) and weight decay (cosine) schedules."""
    total_batch = args.batch_size_per_gpu * args.world_size * args.grad_accum_steps
    lr_schedule = utils.cosine_scheduler(
        args.lr * total_batch / 256.,  # linear scaling rule
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


def build_training(args: argparse.Namespace, niter_per_ep: int) -> SimpleNamespace:
    """Student, teacher, loss, optimizer, precision and schedules, as the training loop uses them."""
    # ============ building student and teacher networks ... ============
    student, embed_dim = backbones.build_backbone(args.arch, args.patch_size, args.drop_path_rate)
    teacher, _ = backbones.build_backbone(args.arch, args.patch_size)
    student = utils.MultiCropWrapper(student, vits.DINOHead(
        embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer))
    if args.pretrained_weights and not engine.has_checkpoint(args.output_dir, args.pretrained_weights):
        checkpointing.init_from_pretrained(student.backbone, {"head.": student.head}, args.pretrained_weights,
                                           args.checkpoint_key, args.arch, args.patch_size)
    teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    student, teacher = student.to(args.device), teacher.to(args.device)
    if not backbones.is_vit(args.arch):  # ours are checked by check_args; a convnet's limit shows in a forward
        sizes = {"--global_crops_size": args.global_crops_size, "--local_crops_size": args.local_crops_size}
        backbones.check_input_sizes(student.backbone, sizes, args.arch)
        if runtime.cpu_bf16(args.device, args.use_fp16, args.amp_dtype):
            backbones.check_cpu_bf16_convolutions(student.backbone, sizes, args.arch)
    speed_setup(args, student.backbone, teacher.backbone)

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
    ).to(args.device)

    optimizer = build_optimizer(args, student)
    precision = runtime.precision_setup(args.device, args.use_fp16, args.amp_dtype)
    print(f"Precision: {precision.description}.")
    lr_schedule, wd_schedule = build_schedules(args, niter_per_ep)
    # momentum parameter is increased to 1. during training with a cosine schedule
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter_per_ep)
    if args.freeze_backbone_epochs:
        print(f"Backbone frozen in student and teacher for {args.freeze_backbone_epochs} epoch(s): heads only.")
    print("Loss, optimizer and schedulers ready.")
    return SimpleNamespace(student=student, teacher=teacher, teacher_without_ddp=teacher_without_ddp,
                           dino_loss=dino_loss, optimizer=optimizer, precision=precision,
                           lr_schedule=lr_schedule, wd_schedule=wd_schedule,
                           momentum_schedule=momentum_schedule)


def train_dino(args: argparse.Namespace) -> None:
    check_args(args)
    runtime.setup_run(args, deterministic=args.deterministic)

    # ============ preparing data ... ============
    dataset, data_loader = build_data(args)
    niter_per_ep = engine.steps_per_epoch(dataset, data_loader, args.grad_accum_steps)

    run = build_training(args, niter_per_ep)
    teacher_backbone, autocast = run.teacher_without_ddp.backbone, run.precision.autocast
    evaluate = eval_knn.online_knn_callback(args, teacher_backbone, autocast, "teacher")
    evaluate = health.epoch_callback(args, dataset.base, teacher_backbone, autocast, evaluate)
    step, after_step = dino_step(run.student, run.teacher, run.teacher_without_ddp, run.dino_loss,
                                 run.momentum_schedule, args.freeze_backbone_epochs * niter_per_ep)
    print("Starting DINO training !")
    engine.fit(args, step=step, student=run.student, optimizer=run.optimizer, data_loader=data_loader,
               lr_schedule=run.lr_schedule, wd_schedule=run.wd_schedule, precision=run.precision,
               state={"teacher": run.teacher, "dino_loss": run.dino_loss}, after_step=after_step, evaluate=evaluate)


def dino_step(student: nn.Module, teacher: nn.Module, teacher_without_ddp: nn.Module, dino_loss: DINOLoss,
              momentum_schedule, frozen_backbone_iters: int = 0):
    """DINO's part of the shared loop: `step` (teacher on the 2 global crops, student on all, DINO loss) and
    `after_step` (the teacher EMA; of the heads only during the first `frozen_backbone_iters` iterations, so
    that a frozen backbone stays bit for bit what it was). The step's metrics carry the training-health
    signals (health.py) of the teacher's distribution and backbone CLS features."""
    student_named = dict(engine.unwrap(student).named_parameters())
    teacher_named = dict(teacher_without_ddp.named_parameters())
    student_params, teacher_params = list(student_named.values()), list(teacher_named.values())
    heads = [n for n in teacher_named if not n.startswith("backbone.")]
    student_heads, teacher_heads = [student_named[n] for n in heads], [teacher_named[n] for n in heads]
    teacher_features = health.InputCatcher(teacher_without_ddp.head)  # the teacher backbone's CLS features

    def step(images, epoch: int, it: int):
        with torch.no_grad():
            teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
        student_output = student(images)
        temp = dino_loss.teacher_temp(epoch)
        teacher_logp = health.teacher_log_probs(teacher_output, dino_loss.center, temp)  # centre before its update
        loss = dino_loss(student_output, teacher_output, epoch)
        signals = health.dino_signals(teacher_logp, loss, teacher_features.pop())
        return loss, {"teacher_temp": temp, **signals}

    def after_step(it: int):
        # EMA update for the teacher
        with torch.no_grad():
            m = float(momentum_schedule[it])  # momentum parameter
            frozen = it < frozen_backbone_iters
            torch._foreach_mul_(teacher_heads if frozen else teacher_params, m)
            torch._foreach_add_(teacher_heads if frozen else teacher_params,
                                student_heads if frozen else student_params, alpha=1 - m)
        return {"teacher_momentum": m}

    return step, after_step


if __name__ == '__main__':
    parser = argparse.ArgumentParser('DINO', parents=[get_args_parser()])
    args = parser.parse_args()
    runtime.run_script(train_dino, args)
