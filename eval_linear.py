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

Runs on CPU, one GPU or under torchrun. Resume, checkpoints and stop signals are engine.py's, as in
pretraining: the same command resumes from `output_dir/checkpoint.pth.tar`, at the exact iteration where a
SIGTERM, SIGINT or SIGUSR2 stopped it (`--saveckp_every_iters` also writes such checkpoints periodically).
"""
import argparse
import math
import os
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import backbones
import data
import engine
import runtime
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
    backbones.add_model_args(parser)  # --arch, --patch_size, --pretrained_weights, --checkpoint_key, data flags
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument("--lr", default=0.001, type=float, help="""Learning rate at the beginning of
        training (highest LR used during training). The learning rate is linearly scaled
        with the batch size, and specified here for a reference batch size of 256.
        We recommend tweaking the LR depending on the checkpoint evaluated.""")
    parser.add_argument('--lrs', default=None, type=float, nargs='+', help="""Several learning rates (each like
        --lr, for a batch of 256) trained side by side in one pass over the frozen features, one linear head each;
        every head's accuracy is reported and the best head is kept. Default: just --lr.""")
    utils.add_distributed_args(parser)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str,
                        help='Folder with train/ and val/ ImageFolder trees (or "synthetic").')
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
    runtime.add_precision_args(parser)  # --use_fp16, --amp_dtype: the frozen backbone's; the heads train in fp32
    parser.add_argument('--seed', default=0, type=int, help="""Seed of the head initialisation, the shuffling and
        the augmentations (and of the random backbone when no --pretrained_weights are given).""")
    parser.add_argument('--print_freq', default=20, type=int, help='Print progress every x iterations.')
    tracking.add_tracking_args(parser)
    engine.add_checkpoint_args(parser)  # --saveckp_every_iters
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
# Heads (backbones.LinearHeads, one per learning rate and pooling, trained side by side), unreadable images
# ----------------------------------------------------------------------------------------------------
def head_name(lr: float, avgpool: bool) -> str:
    return f"lr{lr:g}" + ("_avgpool" if avgpool else "")


def masked_cross_entropy(output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the readable images (`valid`); 0, still attached to the graph, when none is
    (DDP then still gets a gradient from every rank)."""
    loss = F.cross_entropy(output, target, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def name_unreadable(errors: Iterable[str], split: str, named: Set[str]) -> None:
    """Print each unreadable image once per run (`named` holds the paths already named)."""
    for e in errors:
        path = e.split(": ", 1)[0]
        if path not in named:
            named.add(path)
            print(f"WARNING: unreadable {split} image left out of training and accuracy: {e}")


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
        transforms.Normalize(augmentations.IMAGENET_DEFAULT_MEAN, augmentations.IMAGENET_DEFAULT_STD),
    ])


def loader_batches(loader, errors: List[str]) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, readable) of a DataLoader over a LabeledDataset; the unreadable ones go to `errors`."""
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


def train_heads(heads: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, num_batches: int,
                names: Sequence[str], device: torch.device, epoch: int, *, print_freq: int = 20,
                to_features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                position: Optional[Dict] = None, between_steps: Optional[Callable[[int, Callable], None]] = None,
                tracker: Optional[tracking.Tracker] = None) -> Dict[str, Dict[str, float]]:
    """One epoch of every head over `batches` of (images or features, labels, readable); `to_features` turns
    a batch of images into backbone features (None: the batches hold features). Returns {name: {loss, lr}}.

    Mid-epoch resume: `position` (this rank's, from `between_steps`) continues the epoch after its first
    `position["batches"]` batches, which `batches` must already leave out. `between_steps(it, position_fn)` runs
    after every optimizer step but the epoch's last, with the global iteration; `position_fn()` returns this
    rank's position, for a checkpoint. `tracker` gets every head's loss and lr every --log_freq iterations."""
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
            between_steps(epoch * num_batches + it, position_fn)
    # gather the stats from all processes
    metric_logger.synchronize_between_processes()
    # the lr of each head is constant within an epoch (the scheduler steps per epoch)
    return {name: {"loss": metric_logger.meters[f"loss/{name}"].global_avg, "lr": optimizer.param_groups[i]["lr"]}
            for i, name in enumerate(names)}


def check_finite_state(heads: backbones.LinearHeads, names: Sequence[str], ranks: Sequence[Dict], epoch: int,
                       batches: int, checkpoint_path: str) -> None:
    """Refuse to checkpoint a state where every head diverged (non-finite weights, or a non-finite loss on any
    rank so far this epoch): the run would resume it. One diverged head of several is only reported. The same
    decision on every rank (`ranks`: every rank's position)."""
    bad = [name for head, name in zip(heads.heads, names) if engine.nonfinite_weights(head)
           or not all(math.isfinite(float(r["meters"][f"loss/{name}"]["total"])) for r in ranks)]
    if bad and len(bad) == len(names):
        raise utils.UserError(
            f"the loss or weights of head(s) {', '.join(bad)} are not finite at epoch {epoch}, batch {batches}: "
            f"stopping without writing this state; the last checkpoint ({checkpoint_path}, if any) is untouched. "
            "Use lower learning rates (--lr/--lrs).")
    if bad:  # in a sweep, a learning rate too high for its head is a result, not a reason to stop the others
        print(f"WARNING: head(s) {', '.join(bad)} diverged (non-finite loss or weights); the other heads go on")


@torch.no_grad()
def validate(heads: backbones.LinearHeads, features: torch.Tensor, labels: torch.Tensor, readable: torch.Tensor,
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


# ----------------------------------------------------------------------------------------------------
# The script's parts
# ----------------------------------------------------------------------------------------------------
class FrozenBackbone:
    """The frozen backbone of `args`, and the features it gives the heads (under --use_fp16 autocast)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model = backbones.build_eval_model(args.arch, args.patch_size, args.pretrained_weights,
                                                args.checkpoint_key, args.device)
        self.vit = backbones.is_vit(args.arch)
        if self.vit and args.n_last_blocks > len(self.model.blocks):
            raise utils.UserError(f"--n_last_blocks {args.n_last_blocks} is larger than the depth of {args.arch} "
                                  f"({len(self.model.blocks)} blocks): use at most {len(self.model.blocks)}")
        # the backbone only runs forward, frozen: no gradient scaler even for fp16
        precision = runtime.precision_setup(args.device, args.use_fp16, args.amp_dtype)
        self.autocast = precision.autocast
        print(f"Backbone precision: {precision.description}.")
        self.named: Set[str] = set()  # unreadable images already named

    def feature_fn(self, avgpool: bool, n_last_blocks: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
        n = n_last_blocks or self.args.n_last_blocks

        def features(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.autocast():
                return backbones.linear_features(self.model, images, n, avgpool, self.vit).float()
        return features

    def extract(self, dataset: data.LabeledDataset, split: str, avgpool: bool, on_device: bool,
                n_last_blocks: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features of `dataset` in dataset order on every rank, and its readable mask; timed."""
        args, start = self.args, time.time()
        loader = data.build_eval_loader(dataset, args.batch_size_per_gpu, args.num_workers, args.rank,
                                        args.world_size, pin_memory=args.device.type == "cuda")
        features, errors = backbones.extract_features(self.model, loader, args.device, use_cuda=on_device,
                                                      header=f"Features ({split})", print_freq=args.print_freq,
                                                      forward=self.feature_fn(avgpool, n_last_blocks))
        name_unreadable(errors, split, self.named)
        print(f"{split} features of {len(dataset)} images extracted in {time.time() - start:.1f} s "
              f"({features.shape[1]} dims).")
        return features, backbones.readable_mask(dataset.samples, errors)

    def width(self, features: torch.Tensor) -> int:
        """The heads' `feature_dim`: a ViT's embed_dim, else the width of its features."""
        return self.model.embed_dim if self.vit else features.shape[1]


def evaluate_weights(args: argparse.Namespace, backbone: FrozenBackbone, dataset_val: data.LabeledDataset) -> Dict:
    """--evaluate: the val accuracy of given linear weights (--pretrained_linear, else output_dir's best head)."""
    path = args.pretrained_linear or os.path.join(args.output_dir, "checkpoint.pth.tar")
    if not args.pretrained_linear and not os.path.isfile(path):
        raise utils.UserError(f"--evaluate needs linear weights: give --pretrained_linear PATH, or an "
                              f"--output_dir holding checkpoint.pth.tar (none in {args.output_dir})")
    state_dict, meta = backbones.load_linear_weights(path)
    avgpool, n_last_blocks = args.avgpool_patchtokens, args.n_last_blocks
    if meta:  # our checkpoint says which feature its best head was trained on
        avgpool, n_last_blocks = bool(meta["avgpool"]), int(meta["n_last_blocks"])
        print(f"Linear head of {path}: trained with lr {meta['lr']:g}, avgpool_patchtokens {avgpool}, "
              f"n_last_blocks {n_last_blocks} on {meta['arch']} (epoch {meta['epoch']}, val top-1 "
              f"{meta['acc1']:.2f}%)")
        if backbone.vit and n_last_blocks > len(backbone.model.blocks):
            raise utils.UserError(f"{path} was trained on the last {n_last_blocks} blocks; {args.arch} has "
                                  f"{len(backbone.model.blocks)}: use the --arch of the run that wrote it")
    elif avgpool == "both":
        raise utils.UserError(f"{path} does not say whether it takes avgpooled features: give "
                              "--avgpool_patchtokens true or false")
    avgpool = avgpool and backbone.vit
    val_features, val_readable = backbone.extract(dataset_val, "val", avgpool, True, n_last_blocks)
    num_labels, weight_dim = state_dict["linear.weight"].shape
    heads = backbones.LinearHeads([avgpool], num_labels, backbone.width(val_features), n_last_blocks, backbone.vit)
    heads = heads.to(args.device)
    if weight_dim != heads.input_dim(avgpool):
        raise utils.UserError(f"the linear weights of {path} take {weight_dim}-dim features but {args.arch} with "
                              f"--n_last_blocks {n_last_blocks} --avgpool_patchtokens {avgpool} gives "
                              f"{heads.input_dim(avgpool)}: use the flags it was trained with")
    if num_labels < len(dataset_val.classes):
        raise utils.UserError(f"the linear weights of {path} have {num_labels} labels, fewer than the "
                              f"{len(dataset_val.classes)} classes of {args.data_path}")
    heads.heads[0].load_state_dict(state_dict)
    val_labels = torch.tensor(dataset_val.targets, dtype=torch.long)
    test_stats = validate(heads, val_features, val_labels, val_readable)[0]
    print(f"Accuracy of the network on the {int(val_readable.sum())} test images: {test_stats['acc1']:.1f}%")
    return {"test": test_stats, "num_images": int(val_readable.sum())}


def train_batches(args: argparse.Namespace, backbone: FrozenBackbone, dataset_train: data.LabeledDataset,
                  avgpool: bool, errors: List[str]):
    """(batches(epoch, skip), batches per epoch, to_features): the training mini-batches of an epoch, after
    its first `skip` samples, as cached features (--cache_features) or as images (augmented unless
    --train_augmentation false) with `to_features` to run the backbone on them; unreadable images go to
    `errors`."""
    sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=args.world_size, rank=args.rank,
                                                  shuffle=True, seed=args.seed)
    num_batches = math.ceil(sampler.num_samples / args.batch_size_per_gpu)
    if args.cache_features:
        print("--cache_features: the train images get the val transform (no augmentation); their features are "
              "extracted once.")
        features, readable = backbone.extract(dataset_train, "train", avgpool, on_device=False)
        labels = torch.tensor(dataset_train.targets, dtype=torch.long)

        def cached(epoch: int, skip: int) -> Iterable:
            sampler.set_epoch(epoch)
            return cached_batches(features, labels, readable, list(sampler)[skip:], args.batch_size_per_gpu)
        return cached, num_batches, None
    if args.train_augmentation:
        # seeded per sample from (seed, epoch, index): the same augmentations whatever the workers, and after a
        # mid-epoch resume
        dataset_train = data.LabeledDataset(dataset_train.base, train_transform(args.crop_size), seed=args.seed)
    else:
        print("--train_augmentation false: the train images get the val transform.")
    # an EpochSampler, whose set_epoch(epoch, start) skips the batches of an interrupted epoch unread
    loader = data.build_eval_loader(dataset_train, args.batch_size_per_gpu, args.num_workers, args.rank,
                                    args.world_size, shuffle=True, seed=args.seed,
                                    pin_memory=args.device.type == "cuda", epoch_sampler=True)

    def images(epoch: int, skip: int) -> Iterable:
        loader.sampler.set_epoch(epoch, skip)  # the consumed batches are not read again
        return loader_batches(loader, errors)
    return images, num_batches, backbone.feature_fn(avgpool)


class BestHead:
    """The best head so far (by val top-1, then loss) over the epochs: its figures and its weights."""

    def __init__(self, acc: float = 0., head: Optional[Dict] = None, state_dict: Optional[Dict] = None):
        self.acc, self.head, self.state_dict = acc, head, state_dict

    def update(self, test_stats: List[Dict[str, float]], heads: backbones.LinearHeads,
               configs: Sequence[Tuple[float, bool]], names: Sequence[str], epoch: int,
               args: argparse.Namespace) -> int:
        """Take this epoch's best head if it beats the best so far; returns its index."""
        shown = best_index(test_stats)
        if self.head is None or best_index([self.head, test_stats[shown]]) == 1:
            lr, avgpool = configs[shown]
            self.acc = test_stats[shown]["acc1"]
            self.head = {"index": shown, "name": names[shown], "lr": lr, "avgpool": avgpool,
                         "n_last_blocks": args.n_last_blocks, "arch": args.arch,
                         "patch_size": backbones.patch_size_of(args.arch, args.patch_size),
                         "epoch": epoch, "acc1": self.acc, "loss": test_stats[shown]["loss"]}
            self.state_dict = backbones.official_state_dict(heads.heads[shown])
        return shown


def test_stats_record(test_stats: Optional[List[Dict]], names: Sequence[str], shown: int, num_val: int) -> Dict:
    """What log.txt's record of an epoch holds besides the training figures: the official test_* keys (of the
    head `shown`), then every head's when there are several."""
    if test_stats is None:
        return {}
    record = {f"test_{k}": v for k, v in test_stats[shown].items()}
    record["test_num_images"] = num_val
    if len(names) > 1:
        record["test_best_head"] = names[shown]
        for name, s in zip(names, test_stats):
            record.update({f"test_{k}_{name}": v for k, v in s.items()})
    return record


def print_val(test_stats: List[Dict[str, float]], names: Sequence[str], shown: int, epoch: int, num_val: int,
              best: BestHead) -> None:
    for name, s in zip(names, test_stats):
        print(f"* {name}: Acc@1 {s['acc1']:.3f}" + (f" Acc@5 {s['acc5']:.3f}" if "acc5" in s else "")
              + f" loss {s['loss']:.3f}")
    print(f"Accuracy at epoch {epoch} of the network on the {num_val} test images: "
          f"{test_stats[shown]['acc1']:.1f}%" + (f" (best head {names[shown]})" if len(names) > 1 else ""))
    print(f'Max accuracy so far: {best.acc:.2f}%' + (f" ({best.head['name']}, epoch {best.head['epoch']})"
                                                     if len(names) > 1 else ""))


def resume_check(run_config: Dict, path: str) -> Callable[[dict], None]:
    """Refuse a checkpoint.pth.tar of another script or of another set of heads, before anything is loaded."""
    def check(checkpoint: dict) -> None:
        saved = checkpoint.get("run_config")
        if saved is None:
            raise utils.UserError(f"{path} was not written by this eval_linear.py (no run_config): choose another "
                                  "--output_dir, or evaluate it with --evaluate --pretrained_linear")
        if saved != run_config:
            raise utils.UserError(f"{path} belongs to another run ({saved}; this run: {run_config}): use the same "
                                  "--lrs/--lr, --avgpool_patchtokens, --arch and --n_last_blocks, or another "
                                  "--output_dir")
    return check


def continue_schedule(scheduler, optimizer: torch.optim.Optimizer, start_epoch: int, epochs: int) -> None:
    """Resumed with another --epochs than the run that wrote the checkpoint: the cosine now ends at the new
    --epochs, continuing from its value at start_epoch (CosineAnnealingLR updates recursively from the group lr)."""
    if scheduler.T_max == epochs:
        return
    print(f"The cosine schedule ended at epoch {scheduler.T_max}; it now ends at --epochs {epochs}.")
    scheduler.T_max = epochs
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * (1 + math.cos(math.pi * start_epoch / epochs)) / 2


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def eval_linear(args: argparse.Namespace) -> Dict:
    check_args(args)
    runtime.setup_run(args, writes_output=not args.evaluate)
    utils.fix_random_seeds(args.seed)  # the same on every rank: a random backbone (no weights) is the same
    backbone = FrozenBackbone(args)
    dataset_train, dataset_val = data.labeled_splits(args.data_path, args.resize_size, args.crop_size)
    num_classes = len(dataset_val.classes)
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs ({num_classes} classes).")
    if args.evaluate:
        return evaluate_weights(args, backbone, dataset_val)

    # ============ building the linear heads ... ============
    avgpools = [False, True] if args.avgpool_patchtokens == "both" else [args.avgpool_patchtokens]
    if not backbone.vit and avgpools != [False]:
        print(f"Note: --avgpool_patchtokens applies to ViTs only; {args.arch} gives model(images) to the heads.")
        avgpools = [False]
    lrs = args.lrs if args.lrs is not None else [args.lr]
    configs = [(lr, avgpool) for lr in lrs for avgpool in avgpools]
    names = [head_name(lr, avgpool) for lr, avgpool in configs]
    if args.num_labels != num_classes:
        # Outputs that are no class of the dataset can never be a target: the head is sized by the data.
        print(f"Note: --num_labels {args.num_labels} but {args.data_path} has {num_classes} classes: the linear "
              f"classifier gets {num_classes} outputs.")
    val_features, val_readable = backbone.extract(dataset_val, "val", any(avgpools), on_device=True)
    val_labels = torch.tensor(dataset_val.targets, dtype=torch.long)
    torch.manual_seed(args.seed)  # the heads' initialisation does not depend on what ran before
    heads_without_ddp = backbones.LinearHeads([a for _, a in configs], num_classes, backbone.width(val_features),
                                              args.n_last_blocks, backbone.vit).to(args.device)
    heads, _ = engine.distribute(heads_without_ddp, args.device)  # DDP with several processes
    utils.fix_random_seeds(args.seed + args.rank)  # any randomness but the (per-sample seeded) augmentations
    print(f"{len(configs)} linear head(s) on {args.arch} features: " + ", ".join(
        f"lr {lr:g} avgpool {a} ({heads_without_ddp.input_dim(a)} dims)" for lr, a in configs))
    # one param group per head, each with its own lr and the official linear scaling rule; no weight decay
    scale = args.batch_size_per_gpu * args.world_size / 256.
    optimizer = torch.optim.SGD([{"params": head.parameters(), "lr": lr * scale}
                                 for head, (lr, _) in zip(heads_without_ddp.heads, configs)],
                                lr=lrs[0] * scale, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    train_errors: List[str] = []
    batches, num_batches, to_features = train_batches(args, backbone, dataset_train, any(avgpools), train_errors)

    # ============ resume, then train ... ============
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    run_config = {"heads": [{"lr": lr, "avgpool": a} for lr, a in configs], "arch": args.arch,
                  "n_last_blocks": args.n_last_blocks, "num_labels": num_classes}
    best = BestHead()

    def contents(epochs_done: int, ranks: Optional[List[Dict]]) -> Dict:
        if ranks is not None:  # inside an epoch: never checkpoint a state where every head diverged
            check_finite_state(heads_without_ddp, names, ranks, epochs_done, ranks[args.rank]["batches"],
                               checkpoint_path)
        return {"state_dict": best.state_dict,  # the best head (and epoch) in the official format
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best_acc": best.acc,
                "best_head": best.head, "heads": heads_without_ddp.state_dict(), "run_config": run_config}

    run = engine.Run(args.output_dir, checkpoint_name="checkpoint.pth.tar", iters_per_epoch=num_batches,
                     epochs=args.epochs, batch_size_per_gpu=args.batch_size_per_gpu, contents=contents,
                     saveckp_every_iters=args.saveckp_every_iters, tracking_options=tracking.options(args))
    restored = run.resume(check=resume_check(run_config, checkpoint_path), heads=heads_without_ddp,
                          optimizer=optimizer, scheduler=scheduler,
                          run_variables={"best_acc": 0., "best_head": None, "state_dict": None})
    best = BestHead(restored["best_acc"], restored["best_head"], restored["state_dict"])
    if run.start_epoch or run.position:
        print(f"Resuming at epoch {run.start_epoch} (best top-1 so far {best.acc:.2f}%).")
        continue_schedule(scheduler, optimizer, run.start_epoch, args.epochs)

    def between_steps(it: int, position_fn: Callable[[], Dict]) -> None:
        """run.between_steps, with what a position of this loop also holds: the unreadable images and time so far."""
        run.between_steps(it, lambda: {**position_fn(), "errors": list(train_errors),
                                       "elapsed": time.time() - epoch_start})

    with run:
        for epoch in range(run.start_epoch, args.epochs):
            position = run.rank_position(epoch)
            epoch_start = time.time() - (position["elapsed"] if position else 0)
            train_errors[:] = position["errors"] if position else []  # unreadable images of consumed batches
            skip = position["batches"] * args.batch_size_per_gpu if position else 0  # samples consumed
            train_stats = train_heads(heads, optimizer, batches(epoch, skip), num_batches, names, args.device, epoch,
                                      print_freq=args.print_freq, to_features=to_features, position=position,
                                      between_steps=between_steps, tracker=run.tracker)
            scheduler.step()
            epoch_time = time.time() - epoch_start
            print(f"Epoch {epoch} trained in {epoch_time:.2f} s")
            if not args.cache_features:
                name_unreadable(runtime.union_over_ranks(train_errors), "train", backbone.named)
            test_stats, shown = None, best.head["index"] if best.head else 0
            if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
                test_stats = validate(heads_without_ddp, val_features, val_labels, val_readable)
                shown = best.update(test_stats, heads_without_ddp, configs, names, epoch, args)
                print_val(test_stats, names, best_index(test_stats), epoch, int(val_readable.sum()), best)
            train = {**train_stats[names[shown]], "epoch_time": epoch_time}  # the official train_* keys first
            if len(names) > 1:
                train.update({f"{k}_{name}": v for name in names for k, v in train_stats[name].items()})
            run.end_epoch(epoch, train, test_stats_record(test_stats, names, shown, int(val_readable.sum())))
    print("Training of the supervised linear classifier on frozen features completed.\n"
          "Top-1 test accuracy: {acc:.1f}".format(acc=best.acc))
    if best.head and len(names) > 1:
        print(f"Best head: lr {best.head['lr']:g}, avgpool_patchtokens {best.head['avgpool']} "
              f"(epoch {best.head['epoch']}); kept as 'state_dict' in {checkpoint_path}")
    return {"best_acc": best.acc, "best_head": best.head, "log": run.log_history}


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Evaluation with linear classification on ImageNet', parents=[get_args_parser()])
    runtime.run_script(eval_linear, parser.parse_args())
