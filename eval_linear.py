# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Flags, LinearClassifier, features, optimizer, schedule, log and checkpoint format follow facebookresearch/dino's
# eval_linear.py (Apache 2.0).
"""Linear probe on frozen features (the DINO linear evaluation protocol).

    python eval_linear.py --pretrained_weights runs/dino/checkpoint.pth --checkpoint_key teacher \
        --arch vit_small --patch_size 16 --data_path /path/to/imagenet --output_dir runs/linear

`--data_path` holds `train/` and `val/` ImageFolder trees (or is `synthetic`). The official protocol: an
nn.Linear on the concatenated CLS tokens of the last `--n_last_blocks` blocks (plus the mean patch token with
`--avgpool_patchtokens`), SGD with momentum 0.9 and a cosine schedule, the train images augmented with
RandomResizedCrop and flips. Beyond it:

- `--lrs 0.0001 0.001 0.01 0.1` and `--avgpool_patchtokens both` train one head per (lr, avgpool) pair in the
  same pass (one backbone forward per batch); every head's accuracy is logged and the best one is kept.
- `--cache_features` trains without augmentation (the val transform) on features extracted once.
- Unreadable images are named once and left out; `--evaluate` tests linear weights, ours or official.

Runs on CPU, one GPU or under torchrun. Restarting the same command resumes from
`output_dir/checkpoint.pth.tar`. SIGTERM, SIGINT or SIGUSR2 (what SLURM and submitit send before a timeout or
a preemption) finish the current iteration, checkpoint the exact position inside the epoch and stop; the same
command then continues at the next iteration, with the same samples and augmentations, as if never stopped
(`--saveckp_every_iters` also writes such checkpoints periodically, for crashes without a signal).
"""
import argparse
import datetime
import json
import math
import os
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import engine
import eval_knn
import tracking
import utils


def avgpool_flag(s: str) -> Union[bool, str]:
    """`--avgpool_patchtokens`: a boolean (official), or `both` to train heads with and without."""
    return "both" if s.lower() == "both" else utils.bool_flag(s)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Evaluation with linear classification on ImageNet', add_help=False)
    parser.add_argument('--n_last_blocks', default=4, type=int, help="""Concatenate [CLS] tokens
        for the `n` last blocks. We use `n=4` when evaluating ViT-Small and `n=1` with ViT-Base.""")
    parser.add_argument('--avgpool_patchtokens', default=False, type=avgpool_flag,
                        help="""Whether or not to concatenate the global average pooled features to the [CLS] token.
        We typically set this to False for ViT-Small and to True with ViT-Base. `both`: train heads with and without
        it in the same pass (with every --lrs value) and keep the best. ViTs only.""")
    parser.add_argument('--arch', default='vit_small', type=str, help="""Architecture: vit_nano/tiny/small/base/large
        (deit_* aliases), a torchvision model (resnet50) or any timm model name. Non-ViTs give the linear head
        model(images).""")
    parser.add_argument('--patch_size', default=16, type=int, help='Patch resolution of the model.')
    parser.add_argument('--pretrained_weights', default='', type=str, help="""Path to pretrained weights to evaluate
        (a checkpoint of main_dino.py, an official DINO checkpoint, a torchvision, timm or Meta DINOv3 state_dict).
        Empty: random weights, with a warning (never a download).""")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher")')
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument("--lr", default=0.001, type=float, help="""Learning rate at the beginning of
        training (highest LR used during training). The learning rate is linearly scaled
        with the batch size, and specified here for a reference batch size of 256.
        We recommend tweaking the LR depending on the checkpoint evaluated.""")
    parser.add_argument('--lrs', default=None, type=float, nargs='+', help="""Several learning rates (each like
        --lr, for a batch of 256) trained side by side in one pass over the frozen features, one linear head each;
        every head's accuracy is reported and the best head is kept. Default: just --lr.""")
    parser.add_argument('--batch_size_per_gpu', default=128, type=int, help='Per-GPU batch-size')
    utils.add_distributed_args(parser)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str,
                        help='Folder with train/ and val/ ImageFolder trees (or "synthetic").')
    parser.add_argument('--resize_size', default=256, type=int, help="""Short side after the bicubic resize of the
        val transform (256 for ImageNet-size images; e.g. 32 for CIFAR at 32 px).""")
    parser.add_argument('--crop_size', default=224, type=int,
                        help='Side of the val center crop and of the train RandomResizedCrop.')
    parser.add_argument('--num_workers', default=10, type=int, help='Number of data loading workers per GPU.')
    parser.add_argument('--val_freq', default=1, type=int, help="Epoch frequency for validation.")
    parser.add_argument('--output_dir', default=".", help='Path to save logs and checkpoints')
    parser.add_argument('--num_labels', default=1000, type=int, help="""Number of labels for linear classifier.
        When the dataset has another number of classes, the dataset's is used (with a note).""")
    parser.add_argument('--evaluate', dest='evaluate', action='store_true', help="""Evaluate linear weights on the
        validation set: those of --pretrained_linear, else the best head of output_dir/checkpoint.pth.tar.""")
    parser.add_argument('--pretrained_linear', default='', type=str, help="""With --evaluate: linear weights to
        evaluate, a checkpoint.pth.tar of this script or an official *_linearweights.pth (never downloaded).""")
    parser.add_argument('--cache_features', action='store_true', help="""Train without augmentation: the train
        images get the val transform (resize, center crop), so their features never change; they are extracted
        once and all epochs train on the cached tensors (shuffled mini-batches), orders of magnitude faster. Needs
        N x feature_dim x 4 bytes of memory per process.""")
    parser.add_argument('--train_augmentation', default=True, type=utils.bool_flag, help="""RandomResizedCrop and
        horizontal flips on the train images (official). False: the val transform, as --cache_features uses, with
        the features recomputed every epoch.""")
    parser.add_argument('--use_fp16', default=True, type=utils.bool_flag, help="""Run the frozen backbone under
        autocast (see --amp_dtype); the heads train in fp32.""")
    parser.add_argument('--amp_dtype', default='auto', choices=['auto', 'bf16', 'fp16'], help="""With --use_fp16:
        auto = bf16 on GPUs that support it, else fp16; fp32 on CPU. bf16 also on CPU (fast on CPUs with
        AVX512-BF16 or AMX). fp16: GPU only.""")
    parser.add_argument('--seed', default=0, type=int, help="""Seed of the head initialisation, the shuffling and
        the augmentations (and of the random backbone when no --pretrained_weights are given).""")
    parser.add_argument('--print_freq', default=20, type=int, help='Print progress every x iterations.')
    tracking.add_tracking_args(parser)
    parser.add_argument('--saveckp_every_iters', default=0, type=int, help="""Also write checkpoint.pth.tar every
        x iterations inside an epoch, with the exact position, for crashes without a signal (0: only at the end
        of epochs, and on SIGTERM/SIGINT/SIGUSR2, which always checkpoint the exact position and stop).""")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that cannot work, with one message each (before anything is built)."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise utils.UserError(message)

    for name in ("n_last_blocks", "epochs", "batch_size_per_gpu", "val_freq", "num_labels", "resize_size",
                 "crop_size", "patch_size", "print_freq"):
        require(getattr(args, name) >= 1, f"--{name} must be at least 1, got {getattr(args, name)}")
    require(args.num_workers >= 0, f"--num_workers must not be negative, got {args.num_workers}")
    tracking.check_args(args)
    require(args.saveckp_every_iters >= 0,
            f"--saveckp_every_iters must not be negative, got {args.saveckp_every_iters}")
    lrs = args.lrs if args.lrs is not None else [args.lr]
    require(all(lr > 0 and math.isfinite(lr) for lr in lrs), f"learning rates must be positive, got {lrs}")
    require(len(set(lrs)) == len(lrs), f"--lrs has repeated values: {lrs}")
    require(not (args.evaluate and args.cache_features), "--evaluate and --cache_features do not go together")
    require(not args.pretrained_linear or args.evaluate, "--pretrained_linear is used with --evaluate only")


# ----------------------------------------------------------------------------------------------------
# Features and heads
# ----------------------------------------------------------------------------------------------------
def is_vit(arch: str) -> bool:
    """Our ViTs get the official CLS-token features; anything else (timm ViTs included) gives model(images)."""
    return utils.DEIT_ALIASES.get(arch, arch) in utils.VIT_ARCHS


@torch.no_grad()
def backbone_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int, avgpool: bool,
                      vit: bool) -> torch.Tensor:
    """What the frozen backbone gives the heads, computed once per batch for all of them: for a ViT, the CLS
    tokens of the last `n_last_blocks` blocks concatenated (the official feature), then, with `avgpool`, the
    mean patch token of the last block; for other models, model(images)."""
    if not vit:
        return model(images)
    intermediate_output = model.get_intermediate_layers(images, n_last_blocks)
    parts = [x[:, 0] for x in intermediate_output]
    if avgpool:
        parts.append(torch.mean(intermediate_output[-1][:, 1:], dim=1))
    return torch.cat(parts, dim=-1)


class LinearClassifier(nn.Module):
    """Linear layer to train on top of frozen features (the official module: keys linear.weight/bias)."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten
        x = x.view(x.size(0), -1)
        # linear layer
        return self.linear(x)


class LinearHeads(nn.Module):
    """One LinearClassifier per entry of `avgpools`, all fed from the same `backbone_features` output (with the
    mean patch token when any head uses it). Each head sees the official layout of its feature."""

    def __init__(self, avgpools: Sequence[bool], num_labels: int, feature_dim: int, n_last_blocks: int, vit: bool):
        super().__init__()
        self.avgpools, self.n_last_blocks, self.vit = list(avgpools), n_last_blocks, vit
        # for a ViT, feature_dim is the backbone's embed_dim; else the width of model(images)
        self.feature_dim = feature_dim
        self.heads = nn.ModuleList(LinearClassifier(self.input_dim(a), num_labels) for a in self.avgpools)

    def input_dim(self, avgpool: bool) -> int:
        return self.feature_dim * (self.n_last_blocks + int(avgpool)) if self.vit else self.feature_dim

    def head_input(self, features: torch.Tensor, avgpool: bool) -> torch.Tensor:
        if not self.vit:
            return features
        n, dim = self.n_last_blocks, self.feature_dim
        if not avgpool:
            return features[:, :n * dim]
        # The official line, torch.cat((output.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(B, -1),
        # interleaves CLS and mean channel by channel (and only runs for n_last_blocks=1, as used with ViT-B).
        # Interleaving the n CLS tokens and the mean the same way is exactly that layout for n=1, so that the
        # official linear weights load, and defines one for n > 1.
        return features.view(features.shape[0], n + 1, dim).transpose(1, 2).reshape(features.shape[0], -1)

    def forward(self, features: torch.Tensor) -> List[torch.Tensor]:
        inputs = {a: self.head_input(features, a) for a in set(self.avgpools)}
        return [head(inputs[a]) for head, a in zip(self.heads, self.avgpools)]


def head_name(lr: float, avgpool: bool) -> str:
    return f"lr{lr:g}" + ("_avgpool" if avgpool else "")


def masked_cross_entropy(output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the readable images (`valid`); 0, still attached to the graph, when none is
    (DDP then still gets a gradient from every rank)."""
    loss = F.cross_entropy(output, target, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# Unreadable images
# ----------------------------------------------------------------------------------------------------
def name_unreadable(errors: Iterable[str], split: str, named: Set[str]) -> None:
    """Print each unreadable image once per run (`named` holds the paths already named)."""
    for e in errors:
        path = e.split(": ", 1)[0]
        if path not in named:
            named.add(path)
            print(f"WARNING: unreadable {split} image left out of training and accuracy: {e}")


def all_ranks_errors(errors: List[str]) -> List[str]:
    """The union of every rank's list (one collective); the list itself without a process group."""
    if not utils.is_dist_avail_and_initialized() or dist.get_world_size() == 1:
        return sorted(set(errors))
    gathered: List[List[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, errors)
    return sorted({e for rank_errors in gathered for e in rank_errors})


# ----------------------------------------------------------------------------------------------------
# Training and validation
# ----------------------------------------------------------------------------------------------------
def train_transform(crop_size: int):
    """The official training augmentation."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_DEFAULT_MEAN, data.IMAGENET_DEFAULT_STD),
    ])


def loader_batches(loader, errors: List[str]) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, readable) of a DataLoader over an EvalDataset; the unreadable ones go to `errors`."""
    for images, target, bad in loader:
        errors += [b for b in bad if b]
        yield images, target, torch.tensor([not b for b in bad], dtype=torch.bool)


def cached_batches(features: torch.Tensor, labels: torch.Tensor, readable: torch.Tensor, indices: Sequence[int],
                   batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mini-batches of cached features in the order of `indices` (a DistributedSampler's, so that the batches
    are those a DataLoader over the images would give)."""
    indices = torch.as_tensor(list(indices), dtype=torch.long)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        yield features[idx], labels[idx], readable[idx]


def train_one_epoch(heads: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, num_batches: int,
                    names: Sequence[str], device: torch.device, epoch: int, print_freq: int = 20,
                    to_features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    position: Optional[Dict] = None, between_steps: Optional[Callable[[int, Callable], None]] = None,
                    tracker: Optional[tracking.Tracker] = None) -> Dict[str, Dict[str, float]]:
    """One epoch of every head over `batches` of (images or features, labels, readable); `to_features` turns
    a batch of images into backbone features (None: the batches hold features). Returns {name: {loss, lr}}.

    Mid-epoch resume: `position` (this rank's, from `between_steps`) continues the epoch after its first
    `position["batches"]` batches, which `batches` must already leave out. `between_steps(it, position_fn)` runs
    after every optimizer step but the epoch's last; `position_fn()` returns this rank's position, for a
    checkpoint. `tracker` gets every head's loss and lr every --log_freq iterations."""
    heads.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = 'Epoch: [{}]'.format(epoch)
    start = 0
    if position:
        start = position["batches"]
        metric_logger.load_state_dict(position["meters"])  # the epoch averages include the batches before
        print(f"Resuming epoch {epoch} at batch {start} of {num_batches}")

    def position_fn() -> Dict:
        return {"batches": it + 1, "meters": metric_logger.state_dict()}

    for it, (inputs, target, readable) in enumerate(
            metric_logger.log_every(tracker.timed(batches) if tracker else batches, print_freq, header,
                                    total=num_batches, start=start), start=start):
        inputs = inputs.to(device, non_blocking=True)
        target, readable = target.to(device, non_blocking=True), readable.to(device, non_blocking=True)
        features = to_features(inputs) if to_features is not None else inputs
        outputs = heads(features)
        losses = torch.stack([masked_cross_entropy(output, target, readable) for output in outputs])
        optimizer.zero_grad(set_to_none=True)
        # The heads share no parameter: the gradient of the sum gives each head the gradient of its own loss.
        losses.sum().backward()
        optimizer.step()
        losses = losses.detach()
        metric_logger.update(**{f"loss/{name}": losses[i] for i, name in enumerate(names)})
        if tracker is not None and tracker.wants(epoch * num_batches + it):
            tracker.log_iteration(epoch * num_batches + it, {
                **{f"loss/{name}": losses[i] for i, name in enumerate(names)},
                **{f"lr/{name}": optimizer.param_groups[i]["lr"] for i, name in enumerate(names)}})
        if between_steps is not None and it + 1 < num_batches:
            between_steps(it, position_fn)
    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    # the lr of each head is constant within an epoch (the scheduler steps per epoch)
    return {name: {"loss": metric_logger.meters[f"loss/{name}"].global_avg, "lr": optimizer.param_groups[i]["lr"]}
            for i, name in enumerate(names)}


def check_finite_state(heads: LinearHeads, names: Sequence[str], ranks: Sequence[Dict], epoch: int, batches: int,
                       checkpoint_path: str) -> None:
    """Refuse to checkpoint a state where every head diverged (non-finite weights, or a non-finite loss on any
    rank so far this epoch): the run would resume it. One diverged head of several is only reported. The same
    decision on every rank (`ranks`: every rank's position)."""
    bad = [name for head, name in zip(heads.heads, names)
           if not all(torch.isfinite(p).all() for p in head.parameters())
           or not all(math.isfinite(float(r["meters"][f"loss/{name}"]["total"])) for r in ranks)]
    if bad and len(bad) == len(names):
        raise utils.UserError(
            f"the loss or weights of head(s) {', '.join(bad)} are not finite at epoch {epoch}, batch {batches}: "
            f"stopping without writing this state; the last checkpoint ({checkpoint_path}, if any) is untouched. "
            "Use lower learning rates (--lr/--lrs).")
    if bad:  # in a sweep, a learning rate too high for its head is a result, not a reason to stop the others
        print(f"WARNING: head(s) {', '.join(bad)} diverged (non-finite loss or weights); the other heads go on")


@torch.no_grad()
def validate(heads: LinearHeads, features: torch.Tensor, labels: torch.Tensor, readable: torch.Tensor,
             chunk: int = 4096) -> List[Dict[str, float]]:
    """Loss, top-1 and top-5 (%) of every head over the readable images, each counted once (the features are in
    dataset order, without the padding of a DistributedSampler). acc5 only with 5 labels or more (official)."""
    heads.eval()
    device = next(heads.parameters()).device
    num_labels = heads.heads[0].num_labels
    totals = torch.zeros(len(heads.heads), 3, dtype=torch.float64)
    for start in range(0, features.shape[0], chunk):
        target = labels[start:start + chunk].to(device)
        keep = readable[start:start + chunk].to(device)
        for i, output in enumerate(heads(features[start:start + chunk].to(device))):
            loss = F.cross_entropy(output.float(), target, reduction="none")
            correct = output.topk(min(5, num_labels), dim=1).indices.eq(target[:, None])
            totals[i, 0] += (loss * keep).sum().item()
            totals[i, 1] += (correct[:, 0] & keep).sum().item()
            totals[i, 2] += (correct.any(dim=1) & keep).sum().item()
    count = max(int(readable.sum()), 1)
    stats = []
    for loss, top1, top5 in totals.tolist():
        s = {"loss": loss / count, "acc1": 100.0 * top1 / count}
        if num_labels >= 5:
            s["acc5"] = 100.0 * top5 / count
        stats.append(s)
    return stats


def best_index(stats: Sequence[Dict[str, float]]) -> int:
    """The best of several val results (of heads, or of epochs): the best top-1; ties go to the lower val loss,
    then to the first."""
    return min(range(len(stats)), key=lambda i: (-stats[i]["acc1"], stats[i]["loss"], i))


def official_state_dict(head: LinearClassifier) -> Dict[str, torch.Tensor]:
    """A head's weights as the official script saves its DDP-wrapped classifier (module.linear.*), copied."""
    return {f"module.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}


def load_linear_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict]]:
    """(linear.weight/linear.bias, metadata or None) of an official *_linearweights.pth, a checkpoint.pth.tar of
    this script (its best head, with the feature settings it was trained on) or a bare state_dict."""
    checkpoint = utils.load_checkpoint(path)
    if isinstance(checkpoint, dict) and "run_config" in checkpoint and checkpoint.get("state_dict") is None:
        # written inside the first epoch (a signal, --saveckp_every_iters): no head has been validated yet
        raise utils.UserError(f"{path} was written in the middle of epoch {checkpoint.get('epoch')}, before any head "
                              "was validated: finish the training first (the same command without --evaluate)")
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if isinstance(state_dict, dict):
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if not isinstance(state_dict, dict) or set(state_dict) != {"linear.weight", "linear.bias"}:
        keys = sorted(state_dict)[:6] if isinstance(state_dict, dict) else type(checkpoint).__name__
        raise utils.UserError(f"{path} holds no linear classifier (expected 'state_dict' with linear.weight and "
                              f"linear.bias, found {keys}): give a checkpoint.pth.tar of eval_linear.py or an "
                              "official *_linearweights.pth")
    return state_dict, checkpoint.get("best_head")


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def eval_linear(args: argparse.Namespace) -> Dict:
    check_args(args)
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)  # the same on every rank: a random backbone (no weights) is the same
    print("git:\n  {}\n".format(utils.get_sha()))
    print("\n".join("%s: %s" % (k, str(v)) for k, v in sorted(dict(vars(args)).items())))
    cudnn.benchmark = True
    device, rank, world_size = args.device, utils.get_rank(), utils.get_world_size()
    if utils.is_main_process() and not args.evaluate:
        utils.check_output_dir(args.output_dir)

    # ============ building network ... ============
    model = eval_knn.build_eval_model(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key,
                                      device)
    vit = is_vit(args.arch)
    if vit and args.n_last_blocks > len(model.blocks):
        raise utils.UserError(f"--n_last_blocks {args.n_last_blocks} is larger than the depth of {args.arch} "
                              f"({len(model.blocks)} blocks): use at most {len(model.blocks)}")
    avgpools = [False, True] if args.avgpool_patchtokens == "both" else [args.avgpool_patchtokens]
    if not vit and avgpools != [False]:
        print(f"Note: --avgpool_patchtokens applies to ViTs only; {args.arch} gives model(images) to the heads.")
        avgpools = [False]
    # the backbone only runs forward, frozen: no gradient scaler even for fp16
    autocast, _, precision = utils.precision_setup(device, args.use_fp16, args.amp_dtype)
    print(f"Backbone precision: {precision}.")

    def make_feature_fn(avgpool: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def feature_fn(images: torch.Tensor) -> torch.Tensor:
            with autocast():
                return backbone_features(model, images, args.n_last_blocks, avgpool, vit).float()
        return feature_fn

    # ============ preparing data ... ============
    dataset_train, dataset_val = eval_knn.split_datasets(args.data_path, args.resize_size, args.crop_size)
    num_classes = len(dataset_val.classes)
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs ({num_classes} classes).")
    pin_memory = device.type == "cuda"
    named: Set[str] = set()  # unreadable images already named

    def extract(dataset: data.EvalDataset, split: str, avgpool: bool, on_device: bool):
        """Features of `dataset` in dataset order on every rank, and its readable mask; timed."""
        start = time.time()
        loader = data.build_eval_loader(dataset, args.batch_size_per_gpu, args.num_workers, rank, world_size,
                                        pin_memory=pin_memory)
        features, errors = eval_knn.extract_features(model, loader, device, use_cuda=on_device,
                                                     header=f"Features ({split})", print_freq=args.print_freq,
                                                     forward=make_feature_fn(avgpool))
        name_unreadable(errors, split, named)
        print(f"{split} features of {len(dataset)} images extracted in {time.time() - start:.1f} s "
              f"({features.shape[1]} dims).")
        return features, eval_knn.readable_mask(dataset, errors)

    val_labels = torch.tensor(dataset_val.targets, dtype=torch.long)
    if args.evaluate:
        # ============ evaluating given linear weights ... ============
        path = args.pretrained_linear or os.path.join(args.output_dir, "checkpoint.pth.tar")
        if not args.pretrained_linear and not os.path.isfile(path):
            raise utils.UserError(f"--evaluate needs linear weights: give --pretrained_linear PATH, or an "
                                  f"--output_dir holding checkpoint.pth.tar (none in {args.output_dir})")
        state_dict, meta = load_linear_weights(path)
        avgpool, n_last_blocks = args.avgpool_patchtokens, args.n_last_blocks
        if meta:  # our checkpoint says which feature its best head was trained on
            avgpool, n_last_blocks = bool(meta["avgpool"]), int(meta["n_last_blocks"])
            print(f"Linear head of {path}: trained with lr {meta['lr']:g}, avgpool_patchtokens {avgpool}, "
                  f"n_last_blocks {n_last_blocks} on {meta['arch']} (epoch {meta['epoch']}, val top-1 "
                  f"{meta['acc1']:.2f}%)")
            if vit and n_last_blocks > len(model.blocks):
                raise utils.UserError(f"{path} was trained on the last {n_last_blocks} blocks; {args.arch} has "
                                      f"{len(model.blocks)}: use the --arch of the run that wrote it")
        elif avgpool == "both":
            raise utils.UserError(f"{path} does not say whether it takes avgpooled features: give "
                                  "--avgpool_patchtokens true or false")
        args.n_last_blocks = n_last_blocks
        val_features, val_readable = extract(dataset_val, "val", avgpool and vit, on_device=True)
        num_labels, weight_dim = state_dict["linear.weight"].shape
        feature_dim = model.embed_dim if vit else val_features.shape[1]
        heads = LinearHeads([avgpool and vit], num_labels, feature_dim, n_last_blocks, vit).to(device)
        if weight_dim != heads.input_dim(avgpool and vit):
            raise utils.UserError(f"the linear weights of {path} take {weight_dim}-dim features but {args.arch} with "
                                  f"--n_last_blocks {n_last_blocks} --avgpool_patchtokens {avgpool} gives "
                                  f"{heads.input_dim(avgpool and vit)}: use the flags it was trained with")
        if num_labels < num_classes:
            raise utils.UserError(f"the linear weights of {path} have {num_labels} labels, fewer than the "
                                  f"{num_classes} classes of {args.data_path}")
        heads.heads[0].load_state_dict(state_dict)
        test_stats = validate(heads, val_features, val_labels, val_readable)[0]
        print(f"Accuracy of the network on the {int(val_readable.sum())} test images: {test_stats['acc1']:.1f}%")
        return {"test": test_stats, "num_images": int(val_readable.sum())}

    # ============ building the linear heads ... ============
    lrs = args.lrs if args.lrs is not None else [args.lr]
    configs = [(lr, avgpool) for lr in lrs for avgpool in avgpools]
    names = [head_name(lr, avgpool) for lr, avgpool in configs]
    if args.num_labels != num_classes:
        # Outputs that are no class of the dataset can never be a target (too few cannot hold the labels):
        # the head is sized by the data.
        print(f"Note: --num_labels {args.num_labels} but {args.data_path} has {num_classes} classes: the linear "
              f"classifier gets {num_classes} outputs.")
    num_labels = num_classes
    val_features, val_readable = extract(dataset_val, "val", any(avgpools), on_device=True)
    torch.manual_seed(args.seed)  # the heads' initialisation does not depend on what ran before
    heads_without_ddp = LinearHeads([a for _, a in configs], num_labels,
                                    model.embed_dim if vit else val_features.shape[1], args.n_last_blocks, vit)
    heads_without_ddp = heads_without_ddp.to(device)
    heads = heads_without_ddp
    if world_size > 1:
        heads = nn.parallel.DistributedDataParallel(heads, device_ids=[args.gpu] if device.type == "cuda" else None)
    utils.fix_random_seeds(args.seed + rank)  # any randomness but the (per-sample seeded) augmentations
    print(f"{len(configs)} linear head(s) on {args.arch} features: " + ", ".join(
        f"lr {lr:g} avgpool {a} ({heads_without_ddp.input_dim(a)} dims)" for lr, a in configs))

    # set optimizer: one param group per head, each with its own lr and the official linear scaling rule
    scale = args.batch_size_per_gpu * world_size / 256.
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr * scale} for head, (lr, _) in zip(heads_without_ddp.heads, configs)],
        lr=lrs[0] * scale,
        momentum=0.9,
        weight_decay=0,  # we do not apply weight decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)

    # ============ train features: cached once, or computed every batch ... ============
    train_sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world_size, rank=rank,
                                                        shuffle=True, seed=args.seed)
    num_batches = math.ceil(train_sampler.num_samples / args.batch_size_per_gpu)
    train_errors: List[str] = []
    if args.cache_features:
        print("--cache_features: the train images get the val transform (no augmentation); their features are "
              "extracted once.")
        train_features, train_readable = extract(dataset_train, "train", any(avgpools), on_device=False)
        train_labels = torch.tensor(dataset_train.targets, dtype=torch.long)
        to_features = None
    else:
        if args.train_augmentation:
            # seeded per sample from (seed, epoch, index): the same augmentations whatever the workers, and
            # after a mid-epoch resume
            dataset_train = data.EvalDataset(dataset_train.base, train_transform(args.crop_size), seed=args.seed)
        else:
            print("--train_augmentation false: the train images get the val transform.")
        # an EpochSampler, whose set_epoch(epoch, start) skips the batches of an interrupted epoch unread
        train_loader = data.build_eval_loader(dataset_train, args.batch_size_per_gpu, args.num_workers, rank,
                                              world_size, shuffle=True, seed=args.seed, pin_memory=pin_memory,
                                              epoch_sampler=True)
        train_sampler = train_loader.sampler
        to_features = make_feature_fn(any(avgpools))

    # Optionally resume from a checkpoint
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    run_config = {"heads": [{"lr": lr, "avgpool": a} for lr, a in configs], "arch": args.arch,
                  "n_last_blocks": args.n_last_blocks, "num_labels": num_labels}
    if os.path.isfile(checkpoint_path):
        saved = utils.load_checkpoint(checkpoint_path)
        saved_config = saved.get("run_config") if isinstance(saved, dict) else None
        if saved_config is None:
            raise utils.UserError(f"{checkpoint_path} was not written by this eval_linear.py (no run_config): "
                                  "choose another --output_dir, or evaluate it with --evaluate --pretrained_linear")
        if saved_config != run_config:
            raise utils.UserError(f"{checkpoint_path} belongs to another run ({saved_config}; this run: {run_config}): "
                                  "use the same --lrs/--lr, --avgpool_patchtokens, --arch and --n_last_blocks, or "
                                  "another --output_dir")
        saved_position = saved.get("position")
        # a position inside an epoch counts each rank's batches: it means the same samples only with the same
        # shares and batches
        if saved_position is not None and (len(saved_position["ranks"]), saved_position["batch_size_per_gpu"]) != (
                world_size, args.batch_size_per_gpu):
            raise utils.UserError(
                f"{checkpoint_path} was written in the middle of epoch {saved_position['epoch']} by "
                f"{len(saved_position['ranks'])} processes with --batch_size_per_gpu "
                f"{saved_position['batch_size_per_gpu']}; resume it with the same (this run: {world_size} processes, "
                f"--batch_size_per_gpu {args.batch_size_per_gpu})")
        del saved
    to_restore = {"epoch": 0, "best_acc": 0., "best_head": None, "state_dict": None, "log_history": [],
                  "position": None, "tracking": None}
    if utils.is_main_process():
        utils.remove_stale_temporaries(args.output_dir)
    checkpoint = utils.restart_from_checkpoint(
        checkpoint_path,
        run_variables=to_restore,
        heads=heads_without_ddp,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    start_epoch, best_acc = to_restore["epoch"], to_restore["best_acc"]
    best_head, best_state_dict = to_restore["best_head"], to_restore["state_dict"]
    log_history = list(to_restore["log_history"])
    position = to_restore["position"]  # set when the checkpoint was written inside epoch start_epoch
    first = start_epoch * num_batches + (position["batches"] if position else 0)  # iteration resumed at
    tracker = tracking.Tracker(args, start_iteration=first, iters_per_epoch=num_batches,
                               images_per_batch=args.batch_size_per_gpu * world_size, state=to_restore["tracking"])
    log_path = os.path.join(args.output_dir, "log.txt")
    if checkpoint is not None:
        print(f"Resuming at epoch {start_epoch} (best top-1 so far {best_acc:.2f}%).")
        if scheduler.T_max != args.epochs:
            # Another --epochs than the run that wrote the checkpoint: the cosine now ends at the new --epochs,
            # continuing from its value at start_epoch (CosineAnnealingLR updates recursively from the group lr).
            print(f"The cosine schedule ended at epoch {scheduler.T_max}; it now ends at --epochs {args.epochs}.")
            scheduler.T_max = args.epochs
            for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * (1 + math.cos(math.pi * start_epoch / args.epochs)) / 2
        utils.sync_log_with_checkpoint(log_path, log_history)
        del checkpoint
    else:
        utils.sync_log_with_checkpoint(log_path, None)

    def save_checkpoint(epoch_field: int, rank_position: Optional[Dict] = None) -> None:
        """checkpoint.pth.tar after `epoch_field` epochs, or, with this rank's `rank_position`, inside epoch
        `epoch_field` with every rank's position in it (gathered: every rank calls this at the same step)."""
        save_dict = {
            "epoch": epoch_field,
            "state_dict": best_state_dict,  # the best head (and epoch) in the official format
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_acc": best_acc,
            "best_head": best_head,
            "heads": heads_without_ddp.state_dict(),  # every head, as trained so far, to resume
            "run_config": run_config,
            "log_history": log_history,
            "tracking": tracker.state_dict(),
        }
        if rank_position is not None:
            ranks = [rank_position]
            if world_size > 1:
                ranks = [None] * world_size
                dist.all_gather_object(ranks, rank_position)
            check_finite_state(heads_without_ddp, names, ranks, epoch_field, rank_position["batches"],
                               checkpoint_path)
            save_dict["position"] = {"epoch": epoch_field, "batches": rank_position["batches"],
                                     "batch_size_per_gpu": args.batch_size_per_gpu, "ranks": ranks}
        utils.save_on_master(save_dict, checkpoint_path)

    stop = engine.StopSignals(world_size)

    def between_steps(it: int, position_fn: Callable[[], Dict]) -> None:
        """After each optimizer step of `epoch` (but its last): on a signal (agreed by all ranks, so that they
        stop at the same step) or every --saveckp_every_iters iterations, checkpoint the exact position."""
        signum = stop.agreed()
        every = args.saveckp_every_iters
        if signum or (every and (epoch * num_batches + it + 1) % every == 0):
            save_checkpoint(epoch, {**position_fn(), "rng": utils.get_rng_state(), "errors": list(train_errors),
                                    "elapsed": time.time() - epoch_start})
            if signum:
                raise stop.interrupted(signum, f"at epoch {epoch}, iteration {it + 1}/{num_batches}", checkpoint_path)

    start_time = time.time()
    with tracker, stop:
        for epoch in range(start_epoch, args.epochs):
            rank_position = position["ranks"][rank] if position and position["epoch"] == epoch else None
            skip = rank_position["batches"] * args.batch_size_per_gpu if rank_position else 0  # samples consumed
            epoch_start = time.time() - (rank_position["elapsed"] if rank_position else 0)
            if args.cache_features:
                train_sampler.set_epoch(epoch)
                batches = cached_batches(train_features, train_labels, train_readable, list(train_sampler)[skip:],
                                         args.batch_size_per_gpu)
            else:
                train_sampler.set_epoch(epoch, skip)  # the consumed batches are not read again
                batches = loader_batches(train_loader, train_errors)
            if rank_position:
                # nothing in the loop draws from the global RNG today (the data has its own); restored so that
                # whatever does stays exact
                utils.set_rng_state(rank_position["rng"])
                train_errors[:] = rank_position["errors"]  # unreadable images of the consumed batches
            train_stats = train_one_epoch(heads, optimizer, batches, num_batches, names, device, epoch,
                                          args.print_freq, to_features, rank_position, between_steps, tracker)
            position = None
            scheduler.step()
            epoch_time = time.time() - epoch_start
            print(f"Epoch {epoch} trained in {epoch_time:.2f} s")
            if not args.cache_features:
                name_unreadable(all_ranks_errors(train_errors), "train", named)
                train_errors.clear()

            shown = best_head["index"] if best_head else 0  # the head whose stats carry the official keys
            log_stats: Dict = {}
            if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
                test_stats = validate(heads_without_ddp, val_features, val_labels, val_readable)
                shown = best_index(test_stats)
                for name, s in zip(names, test_stats):
                    print(f"* {name}: Acc@1 {s['acc1']:.3f}" + (f" Acc@5 {s['acc5']:.3f}" if "acc5" in s else "")
                          + f" loss {s['loss']:.3f}")
                print(f"Accuracy at epoch {epoch} of the network on the {int(val_readable.sum())} test images: "
                      f"{test_stats[shown]['acc1']:.1f}%" + (f" (best head {names[shown]})" if len(names) > 1 else ""))
                if best_head is None or best_index([best_head, test_stats[shown]]) == 1:
                    lr, avgpool = configs[shown]
                    best_acc = test_stats[shown]["acc1"]
                    best_head = {"index": shown, "name": names[shown], "lr": lr, "avgpool": avgpool,
                                 "n_last_blocks": args.n_last_blocks, "arch": args.arch, "patch_size": args.patch_size,
                                 "epoch": epoch, "acc1": best_acc, "loss": test_stats[shown]["loss"]}
                    best_state_dict = official_state_dict(heads_without_ddp.heads[shown])
                print(f'Max accuracy so far: {best_acc:.2f}%' + (f" ({best_head['name']}, epoch {best_head['epoch']})"
                                                                 if len(names) > 1 else ""))
                log_stats.update({f"test_{k}": v for k, v in test_stats[shown].items()})
                log_stats["test_num_images"] = int(val_readable.sum())
                if len(names) > 1:
                    log_stats["test_best_head"] = names[shown]
                    for name, s in zip(names, test_stats):
                        log_stats.update({f"test_{k}_{name}": v for k, v in s.items()})
            # official keys first: the train stats of the head shown (this epoch's best, else the best so far)
            log_stats = {**{f"train_{k}": v for k, v in train_stats[names[shown]].items()},
                         'epoch': epoch, "train_epoch_time": epoch_time, **log_stats}
            if len(names) > 1:
                for name in names:
                    log_stats.update({f"train_{k}_{name}": v for k, v in train_stats[name].items()})
            log_history.append(log_stats)
            save_checkpoint(epoch + 1)
            if utils.is_main_process():
                with open(log_path, "a") as f:
                    f.write(json.dumps(log_stats) + "\n")
            tracker.log_epoch((epoch + 1) * num_batches - 1, log_stats)
            signum = stop.agreed()
            if signum and epoch + 1 < args.epochs:
                raise stop.interrupted(signum, f"after epoch {epoch}", checkpoint_path)
    total_time = time.time() - start_time
    print('Training time {}'.format(str(datetime.timedelta(seconds=int(total_time)))))
    print("Training of the supervised linear classifier on frozen features completed.\n"
          "Top-1 test accuracy: {acc:.1f}".format(acc=best_acc))
    if best_head and len(names) > 1:
        print(f"Best head: lr {best_head['lr']:g}, avgpool_patchtokens {best_head['avgpool']} "
              f"(epoch {best_head['epoch']}); kept as 'state_dict' in {checkpoint_path}")
    if utils.is_dist_avail_and_initialized():
        dist.barrier()
    return {"best_acc": best_acc, "best_head": best_head, "log": log_history}


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Evaluation with linear classification on ImageNet', parents=[get_args_parser()])
    utils.run_script(eval_linear, parser.parse_args())
