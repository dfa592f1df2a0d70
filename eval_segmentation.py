# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# The head, its loss and the metrics follow DINOv2's linear segmentation evaluation (facebookresearch/dinov2,
# Apache 2.0: dinov2/eval/segmentation, BNHead) and mmsegmentation 0.x (Apache 2.0: decode_head.py, metrics.py).
"""Dense linear probe: semantic segmentation from frozen patch features (DINOv2's linear protocol).

    python eval_segmentation.py --pretrained_weights runs/quickstart/checkpoint.pth --arch vit_tiny \
        --patch_size 16 --data_path synthetic --resize_size 64 --crop_size 64 --output_dir runs/quickstart/seg

The frozen backbone's patch features of the last layer (`--n_last_blocks 4`: the last four, concatenated, as
DINOv2's "+ms" head takes them), a BatchNorm and a 1x1 convolution, the logits upsampled bilinearly to the mask:
DINOv2's BNHead. Trained with cross-entropy over the labelled pixels (`--ignore_index` pixels left out; the mean
is over all pixels, as mmsegmentation 0.x computes it), AdamW, linear warm-up then linear decay per iteration.
Reports mIoU (the mean over the classes that occur in the val masks or predictions), mean class accuracy and
pixel accuracy, as mmsegmentation does, and draws the best head's predictions beside the images and their masks
(`predictions.png`).

`--data_path` holds `train/images`, `train/masks`, `val/images`, `val/masks` (masks: class-index PNGs with the
images' names), or ADE20K's `images/{training,validation}` and `annotations/{training,validation}`
(`--num_classes 150 --reduce_zero_label`), or is `synthetic`: the quickstart's shapes with their masks (11
classes: background and the 10 shape kinds). Images and masks are cropped together: random resized crops and
flips for training, resize and center crop for validation (no sliding window, no multi-scale test).

Several `--lrs` train one head each in the same pass (one backbone forward per batch); the best head by val mIoU
is kept. Any backbone with a patch grid: our ViTs, Meta's DINOv2 files, timm models, torchvision ResNets (the last
feature map). Runs on CPU, one GPU or under torchrun; the same command resumes (at the exact iteration after a
SIGTERM, SIGINT or SIGUSR2).
"""
import argparse
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import augmentations
import backbones
import checkpointing
import data
import engine
import runtime
import segmentation_data
import tracking
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Linear segmentation on frozen patch features', add_help=False)
    backbones.add_model_args(parser, batch_size=16)  # --arch, --patch_size, --pretrained_weights, image sizes
    parser.add_argument('--n_last_blocks', default=1, type=int, help="""Patch features of the last n layers,
        concatenated: 1 is DINOv2's "linear" head, 4 the layers of its "+ms" head. n > 1 needs a ViT.""")
    parser.add_argument('--data_path', default='synthetic', type=str, help="""Folder with train/images,
        train/masks, val/images and val/masks (or ADE20K's images/ and annotations/), or "synthetic".""")
    parser.add_argument('--num_classes', default=None, type=int, help="""Number of classes of the masks (indices
        0..num_classes-1). Default: the data's, when it says (synthetic).""")
    parser.add_argument('--ignore_index', default=255, type=int,
                        help="Mask value of unlabelled pixels, left out of the loss and the metrics.")
    parser.add_argument('--reduce_zero_label', default=False, type=utils.bool_flag, help="""ADE20K's raw
        annotations: index 0 ("other") is ignored and index i becomes class i - 1.""")
    parser.add_argument('--epochs', default=20, type=int, help='Number of epochs of training.')
    parser.add_argument('--lrs', default=[1e-3], type=float, nargs='+', help="""Learning rates of AdamW, one head
        each, trained side by side; the best head (val mIoU) is kept. DINOv2: 1e-3 for a batch of 16.""")
    parser.add_argument('--weight_decay', default=1e-4, type=float, help="AdamW weight decay (DINOv2: 1e-4).")
    parser.add_argument('--warmup_epochs', default=1, type=float,
                        help="Linear warm-up of the learning rate, then linear decay to 0 (poly, power 1).")
    parser.add_argument('--train_augmentation', default=True, type=utils.bool_flag, help="""Random resized crops
        (25-100%% of the image) and flips on the train pairs; false: the val resize and center crop.""")
    utils.add_distributed_args(parser)
    parser.add_argument('--val_freq', default=1, type=int, help="Epoch frequency for validation.")
    parser.add_argument('--output_dir', default=".", help='Path to save logs, checkpoints and pictures')
    parser.add_argument('--num_pictures', default=8, type=int,
                        help="Val images drawn with their mask and the best head's prediction (0: none).")
    runtime.add_precision_args(parser)  # the frozen backbone's; the heads train in fp32
    parser.add_argument('--seed', default=0, type=int, help="Seed of the heads, the shuffling and the crops.")
    parser.add_argument('--print_freq', default=20, type=int, help='Print progress every x iterations.')
    tracking.add_tracking_args(parser)
    engine.add_checkpoint_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise utils.UserError(message)

    for name in ("n_last_blocks", "epochs", "batch_size_per_gpu", "val_freq", "resize_size", "crop_size",
                 "patch_size", "print_freq"):
        require(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    require(args.num_classes is None or args.num_classes >= 2, f"--num_classes must be at least 2, got {args.num_classes}")
    require(args.num_workers >= 0 and args.num_pictures >= 0, "--num_workers and --num_pictures must not be negative")
    require(all(lr > 0 and math.isfinite(lr) for lr in args.lrs), f"learning rates must be positive, got {args.lrs}")
    require(len(set(args.lrs)) == len(args.lrs), f"--lrs has repeated values: {args.lrs}")
    require(args.weight_decay >= 0 and args.warmup_epochs >= 0, "--weight_decay and --warmup_epochs must not be negative")
    require(args.crop_size <= args.resize_size, f"--crop_size {args.crop_size} is larger than --resize_size "
            f"{args.resize_size}: the val center crop would pad the images; use --resize_size >= --crop_size")
    require(0 <= args.ignore_index, f"--ignore_index must not be negative, got {args.ignore_index}")
    require(args.num_classes is None or args.ignore_index >= args.num_classes,
            f"--ignore_index {args.ignore_index} is one of the {args.num_classes} classes: give a value outside "
            f"0..{args.num_classes - 1 if args.num_classes else 0} (255 usually)")
    tracking.check_args(args)
    require(args.saveckp_every_iters >= 0, "--saveckp_every_iters must not be negative")


# ----------------------------------------------------------------------------------------------------
# The head, its loss, the metrics
# ----------------------------------------------------------------------------------------------------
class LinearSegmentationHead(nn.Module):
    """DINOv2's BNHead: feature maps of one or more layers ([B, D, h, w] each, brought to the first's size and
    concatenated), a BatchNorm and a 1x1 convolution to `num_classes` logits at the patch grid."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmsegmentation's init of conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[2:]
        x = torch.cat([m if m.shape[2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                       for m in maps], dim=1)
        return self.conv_seg(self.bn(x))


class SegmentationHeads(nn.Module):
    """One LinearSegmentationHead per learning rate, trained side by side on the same features."""

    def __init__(self, count: int, in_channels: int, num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList([LinearSegmentationHead(in_channels, num_classes) for _ in range(count)])

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [head(maps) for head in self.heads]


def upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits at the patch grid -> at the mask's size (bilinear, as mmsegmentation's resize)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of the upsampled logits, summed over the labelled pixels and divided by all pixels, as
    mmsegmentation 0.x's CrossEntropyLoss (avg_non_ignore False) does in DINOv2's evaluation; a batch without
    any labelled pixel gives 0, still attached to the graph."""
    loss = F.cross_entropy(upsample(logits, target.shape[1:]).float(), target, ignore_index=ignore_index,
                           reduction="none")
    return loss.sum() / target.numel()


def area_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """[4, num_classes] pixel counts per class over the labelled pixels: intersection, union, predicted, labelled
    (mmsegmentation's intersect_and_union, summed over the batch)."""
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    area_intersect = torch.bincount(target[pred == target], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(target, minlength=num_classes)
    return torch.stack([area_intersect, area_pred + area_label - area_intersect, area_pred, area_label]).double()


def segmentation_metrics(counts: torch.Tensor) -> Dict[str, float]:
    """mIoU, mAcc (%) over the classes present in the labels or the predictions (a class with no pixel in either
    has no IoU and is left out, as mmsegmentation's nanmean does), and aAcc (%), the pixel accuracy."""
    intersect, union, _, label = counts.double().cpu()
    iou = intersect / union  # nan where union is 0
    acc = intersect / label
    return {"mIoU": 100 * float(np.nanmean(iou.numpy())) if bool((union > 0).any()) else 0.,
            "mAcc": 100 * float(np.nanmean(acc.numpy())) if bool((label > 0).any()) else 0.,
            "aAcc": 100 * float(intersect.sum() / label.sum().clamp(min=1)),
            "IoU": [100 * float(v) for v in iou.tolist()]}


# ----------------------------------------------------------------------------------------------------
# The frozen backbone, training and validation
# ----------------------------------------------------------------------------------------------------
class FrozenBackbone:
    """The frozen backbone of `args` and its feature maps ([B, D, h, w] per layer, fp32) under --use_fp16."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = backbones.build_eval_model(args.arch, args.patch_size, args.pretrained_weights,
                                                args.checkpoint_key, args.device)
        if backbones.is_vit(args.arch) and args.n_last_blocks > len(self.model.blocks):
            raise utils.UserError(f"--n_last_blocks {args.n_last_blocks} is larger than the depth of {args.arch} "
                                  f"({len(self.model.blocks)} blocks)")
        precision = runtime.precision_setup(args.device, args.use_fp16, args.amp_dtype)
        self.autocast = precision.autocast
        print(f"Backbone precision: {precision.description}.")
        # one image through the backbone now: a model without a patch grid stops here, not in the first batch
        probe = self.maps(torch.zeros(1, 3, args.crop_size, args.crop_size, device=args.device))
        self.channels, self.grid = sum(m.shape[1] for m in probe), tuple(probe[0].shape[2:])
        print(f"Patch features: {len(probe)} layer(s), {self.channels} channels on a {self.grid[0]}x{self.grid[1]} grid "
              f"for {args.crop_size} px crops.")

    def maps(self, images: torch.Tensor) -> List[torch.Tensor]:
        with torch.no_grad(), self.autocast():
            layers = backbones.patch_features(self.model, images, self.args.arch, self.args.n_last_blocks)
        return [x.float().permute(0, 3, 1, 2).contiguous() for x in layers]


def check_items(errors: Sequence[str]) -> None:
    """Stop every rank at once, with the first bad pair any rank read (a wrong mask is a labelling error to fix,
    not an image to leave out: the metrics would silently change)."""
    runtime.raise_together(next((e for e in errors if e), None))


def train_epoch(heads: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule: np.ndarray, loader,
                backbone: FrozenBackbone, args: argparse.Namespace, epoch: int, names: Sequence[str],
                position: Optional[Dict], between_steps: Callable[[int, Callable[[], Dict]], None],
                tracker: tracking.Tracker) -> Dict[str, Dict[str, float]]:
    """One epoch of every head; `position` (this rank's, inside an interrupted epoch) continues it. Returns
    {name: {loss, lr}} (the epoch's mean loss, the last lr)."""
    heads.train()
    num_batches = len(loader)
    metric_logger = utils.MetricLogger(delimiter="  ")
    start = 0
    if position:
        start = position["batches"]
        metric_logger.load_state_dict(position["meters"])
        print(f"Resuming epoch {epoch} at batch {start} of {num_batches}")

    def position_fn() -> Dict:
        return {"batches": it + 1, "meters": metric_logger.state_dict()}

    for it, (images, target, errors) in enumerate(
            metric_logger.log_every(tracker.timed(loader), args.print_freq, f"Epoch: [{epoch}]", total=num_batches,
                                    start=start), start=start):
        check_items(errors)
        step = epoch * num_batches + it
        for group, lr in zip(optimizer.param_groups, args.lrs):
            group["lr"] = lr * float(lr_schedule[step])
        maps = backbone.maps(images.to(args.device, non_blocking=True))
        target = target.to(args.device, non_blocking=True)
        losses = torch.stack([segmentation_loss(logits, target, args.ignore_index) for logits in heads(maps)])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the heads share no parameter: each gets the gradient of its own loss
        optimizer.step()
        losses = losses.detach()
        metric_logger.update(**{f"loss/{name}": losses[i] for i, name in enumerate(names)})
        if tracker.wants(step):
            tracker.log_iteration(step, {**{f"loss/{n}": losses[i] for i, n in enumerate(names)},
                                         **{f"lr/{n}": g["lr"] for n, g in zip(names, optimizer.param_groups)}})
        if not torch.isfinite(losses).any():
            raise utils.UserError(f"the loss of every head is not finite at epoch {epoch}, iteration {it}: lower "
                                  "--lrs; the last checkpoint is untouched")
        if it + 1 < num_batches:
            between_steps(step, position_fn)
    metric_logger.synchronize_between_processes()
    return {name: {"loss": metric_logger.meters[f"loss/{name}"].global_avg, "lr": group["lr"]}
            for name, group in zip(names, optimizer.param_groups)}


def average_batchnorm_statistics(heads: nn.Module) -> None:
    """The heads' BatchNorm running statistics averaged over the processes. Without SyncBatchNorm (CPU
    processes) each rank's own batches update its copy: validation on every rank, and the checkpoint, must use
    one set of heads."""
    if utils.is_dist_avail_and_initialized():
        for name, buffer in heads.named_buffers():
            if "running_" in name:
                dist.all_reduce(buffer)
                buffer /= dist.get_world_size()


def rank_share(dataset, rank: int, world_size: int) -> torch.utils.data.Subset:
    """This rank's val images (rank, rank + W, ...): every image counted exactly once over the ranks."""
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))


@torch.no_grad()
def validate(heads: SegmentationHeads, loader, backbone: FrozenBackbone, args: argparse.Namespace,
             num_classes: int) -> List[Dict[str, float]]:
    """Every head's metrics over the val pairs (pixel counts summed over the ranks)."""
    heads.eval()
    counts = torch.zeros(len(heads.heads), 4, num_classes, dtype=torch.float64, device=args.device)
    for images, target, errors in utils.MetricLogger(delimiter="  ").log_every(loader, args.print_freq, "Val"):
        check_items(errors)
        target = target.to(args.device)
        for i, logits in enumerate(heads(backbone.maps(images.to(args.device)))):
            counts[i] += area_counts(upsample(logits, target.shape[1:]).argmax(1), target, num_classes,
                                     args.ignore_index)
    if utils.is_dist_avail_and_initialized():
        dist.all_reduce(counts)
    return [segmentation_metrics(c) for c in counts]


def best_index(stats: Sequence[Dict[str, float]]) -> int:
    """The best of several val results: the highest mIoU, then pixel accuracy, then the first."""
    return min(range(len(stats)), key=lambda i: (-stats[i]["mIoU"], -stats[i]["aAcc"], i))


# ----------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------
def picture_rows(images: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, num_classes: int,
                 ignore_index: int, min_side: int = 128) -> np.ndarray:
    """[H, W, 3] uint8: one row per image, image | ground truth | prediction, enlarged (nearest) to at least
    `min_side` px so that 64 px shapes can be seen."""
    mean = torch.tensor(augmentations.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(augmentations.IMAGENET_DEFAULT_STD).view(3, 1, 1)
    scale = max(1, math.ceil(min_side / images.shape[-1]))
    rows = []
    for image, t, p in zip(images.cpu(), target.cpu().numpy(), pred.cpu().numpy()):
        rgb = ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        tiles = [rgb, segmentation_data.colourise(t, num_classes, ignore_index),
                 segmentation_data.colourise(p, num_classes, ignore_index)]
        tiles = [np.kron(tile, np.ones((scale, scale, 1), dtype=np.uint8)) for tile in tiles]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    return np.concatenate(rows[:-1], axis=0)


@torch.no_grad()
def save_pictures(head: LinearSegmentationHead, dataset, backbone: FrozenBackbone, args: argparse.Namespace,
                  num_classes: int, path: str) -> None:
    """The best head's predictions on `--num_pictures` val images spread over the val set (rank 0)."""
    count = min(args.num_pictures, len(dataset))
    items = [dataset[int(i)] for i in np.linspace(0, len(dataset) - 1, count).round()]
    images, target = torch.stack([x[0] for x in items]), torch.stack([x[1] for x in items])
    head.eval()
    pred = upsample(head(backbone.maps(images.to(args.device))), target.shape[1:]).argmax(1)
    grid = picture_rows(images, target, pred, num_classes, args.ignore_index)
    checkpointing.atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"), what="picture")
    print(f"Predictions of the best head on {count} val images (image | mask | prediction): {path}")


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def eval_segmentation(args: argparse.Namespace) -> Dict:
    check_args(args)
    runtime.setup_run(args)
    utils.fix_random_seeds(args.seed)  # the same on every rank: a random backbone (no weights) is the same
    dataset_train, dataset_val, classes = segmentation_data.build_datasets(
        args.data_path, args.resize_size, args.crop_size, args.num_classes, args.ignore_index, args.reduce_zero_label,
        args.seed)
    if not args.train_augmentation:
        dataset_train.transform = dataset_val.transform
        print("--train_augmentation false: the train pairs get the val resize and center crop.")
    num_classes = len(classes)
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val pairs ({num_classes} classes).")
    backbone = FrozenBackbone(args)

    torch.manual_seed(args.seed)  # the heads' initialisation does not depend on what ran before
    names = [f"lr{lr:g}" for lr in args.lrs]
    heads_without_ddp = SegmentationHeads(len(args.lrs), backbone.channels, num_classes).to(args.device)
    heads, _ = engine.distribute(heads_without_ddp, args.device)  # DDP (SyncBatchNorm on GPUs) with several processes
    utils.fix_random_seeds(args.seed + args.rank)
    optimizer = torch.optim.AdamW([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads_without_ddp.heads, args.lrs)],
                                  weight_decay=args.weight_decay)
    pin = args.device.type == "cuda"
    loader = data.build_eval_loader(dataset_train, args.batch_size_per_gpu, args.num_workers, args.rank,
                                    args.world_size, shuffle=True, seed=args.seed, pin_memory=pin,
                                    epoch_sampler=True, drop_last=False)
    val_loader = torch.utils.data.DataLoader(rank_share(dataset_val, args.rank, args.world_size),
                                             batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                                             pin_memory=pin)
    niter = args.epochs * len(loader)
    warmup = min(int(args.warmup_epochs * len(loader)), niter)
    lr_schedule = np.concatenate([np.linspace(0, 1, warmup, endpoint=False), 1 - np.arange(niter - warmup) / (niter - warmup)])
    print(f"{len(names)} head(s) of {backbone.channels} -> {num_classes} on {args.arch}, AdamW lr {', '.join(names)}, "
          f"{args.epochs} epochs of {len(loader)} iterations.")

    # ============ resume, then train ... ============
    run_config = {"lrs": list(args.lrs), "arch": args.arch, "n_last_blocks": args.n_last_blocks,
                  "num_classes": num_classes, "crop_size": args.crop_size}
    best: Dict = {"stats": None, "head": None, "state_dict": None}

    def contents(epochs_done: int, ranks: Optional[List[Dict]]) -> Dict:
        return {"heads": heads_without_ddp.state_dict(), "optimizer": optimizer.state_dict(), "best": best,
                "run_config": run_config, "classes": classes}

    def check(checkpoint: dict) -> None:
        if checkpoint.get("run_config") != run_config:
            raise utils.UserError(f"{run.path} belongs to another run ({checkpoint.get('run_config')}; this run: "
                                  f"{run_config}): use the same flags, or another --output_dir")

    run = engine.Run(args.output_dir, iters_per_epoch=len(loader), epochs=args.epochs,
                     batch_size_per_gpu=args.batch_size_per_gpu, contents=contents,
                     saveckp_every_iters=args.saveckp_every_iters, tracking_options=tracking.options(args))
    restored = run.resume(check=check, heads=heads_without_ddp, optimizer=optimizer, run_variables={"best": best})
    best = restored["best"]
    if run.start_epoch or run.position:
        print(f"Resuming at epoch {run.start_epoch}.")

    with run:
        for epoch in range(run.start_epoch, args.epochs):
            position = run.rank_position(epoch)
            epoch_start = time.time()
            loader.sampler.set_epoch(epoch, position["batches"] * args.batch_size_per_gpu if position else 0)
            train_stats = train_epoch(heads, optimizer, lr_schedule, loader, backbone, args, epoch, names, position,
                                      run.between_steps, run.tracker)
            average_batchnorm_statistics(heads_without_ddp)
            test: Dict = {}
            if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
                stats = validate(heads_without_ddp, val_loader, backbone, args, num_classes)
                shown = best_index(stats)
                for name, s in zip(names, stats):
                    print(f"* {name}: mIoU {s['mIoU']:.2f}  mAcc {s['mAcc']:.2f}  aAcc {s['aAcc']:.2f}")
                if best["stats"] is None or best_index([best["stats"], stats[shown]]) == 1:
                    best.update(stats=stats[shown], state_dict=heads_without_ddp.heads[shown].state_dict(),
                                head={"name": names[shown], "lr": args.lrs[shown], "epoch": epoch})
                test = {f"test_{k}": v for k, v in stats[shown].items()}
                test.update({f"test_{k}_{n}": s[k] for n, s in zip(names, stats) for k in ("mIoU", "aAcc")})
            train = {**train_stats[names[0]], "epoch_time": time.time() - epoch_start}
            train.update({f"{k}_{n}": v for n in names for k, v in train_stats[n].items()})
            run.end_epoch(epoch, train, test)

    stats = best["stats"] or {"mIoU": 0., "aAcc": 0., "mAcc": 0.}
    print(f"Best head {best['head']['name'] if best['head'] else '-'}: mIoU {stats['mIoU']:.2f}, "
          f"pixel accuracy {stats['aAcc']:.2f} on {len(dataset_val)} val images")
    if best["state_dict"] is not None and args.num_pictures and runtime.is_main_process():
        head = LinearSegmentationHead(backbone.channels, num_classes).to(args.device)
        head.load_state_dict(best["state_dict"])
        save_pictures(head, dataset_val, backbone, args, num_classes, os.path.join(args.output_dir, "predictions.png"))
    return {"best": best, "classes": classes, "log": run.log_history}


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Linear segmentation on frozen patch features', parents=[get_args_parser()])
    runtime.run_script(eval_segmentation, parser.parse_args())
