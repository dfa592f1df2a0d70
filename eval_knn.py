# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Flags and the weighted k-NN vote follow facebookresearch/dino's eval_knn.py (Apache 2.0).
"""Weighted k-NN classification on frozen features (Wu et al. 2018, as in DINO).

    python eval_knn.py --pretrained_weights runs/dino/checkpoint.pth --checkpoint_key teacher \
        --arch vit_small --patch_size 16 --data_path /path/to/imagenet

`--data_path` holds `train/` and `val/` ImageFolder trees. Runs on CPU, one GPU or under torchrun
(every rank extracts its share of the features; they are gathered in dataset order). The same
functions serve the online k-NN of the training scripts: `online_knn_callback` gives `engine.fit` the
`evaluate(epoch)` it runs after every epoch.
"""
import argparse
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import backbones
import checkpointing
import data
import runtime
import utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('Evaluation with weighted k-NN on ImageNet', add_help=False)
    backbones.add_model_args(parser)
    parser.add_argument('--nb_knn', default=[10, 20, 100, 200], nargs='+', type=int,
                        help='Number of NN to use. 20 is usually working the best.')
    parser.add_argument('--temperature', default=0.07, type=float,
                        help='Temperature used in the voting coefficient')
    parser.add_argument('--use_cuda', default=True, type=utils.bool_flag,
                        help="Should we store the features on GPU? We recommend setting this to False if you encounter OOM")
    parser.add_argument('--dump_features', default=None,
                        help='Path where to save computed features, empty for no saving')
    parser.add_argument('--load_features', default=None, help="""If the features have
        already been computed, where to find them.""")
    parser.add_argument('--seed', default=0, type=int, help="""Seed of the random initialisation when no
        --pretrained_weights are given (so that the random baseline is reproducible).""")
    utils.add_distributed_args(parser)
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=str,
                        help='Folder with train/ and val/ ImageFolder trees (or "synthetic").')
    return parser


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------
def drop_unreadable(features: torch.Tensor, labels: torch.Tensor, dataset: data.LabeledDataset,
                    errors: Sequence[str], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Leave out the images that could not be read, naming each one."""
    if not errors:
        return features, labels
    for e in errors:
        print(f"WARNING: unreadable {split} image left out of the evaluation: {e}")
    keep = backbones.readable_mask(dataset.samples, errors).to(features.device)
    return features[keep], labels[keep.to(labels.device)]


def compute_features(model: nn.Module, dataset_train: data.LabeledDataset, dataset_val: data.LabeledDataset,
                     batch_size: int, num_workers: int, device: torch.device, use_cuda: bool = True):
    """L2-normalised train and val features and their labels, in dataset order, unreadable images left out."""
    rank, world = utils.get_rank(), utils.get_world_size()
    out = []
    for split, dataset in (("train", dataset_train), ("val", dataset_val)):
        loader = data.build_eval_loader(dataset, batch_size, num_workers, rank, world,
                                        pin_memory=device.type == "cuda")
        print(f"Extracting features for {split} set ({len(dataset)} images)...")
        features, errors = backbones.extract_features(model, loader, device, use_cuda,
                                                      header=f"Features ({split})")
        features = nn.functional.normalize(features, dim=1, p=2)
        labels = torch.tensor(dataset.targets, dtype=torch.long, device=features.device)
        out += drop_unreadable(features, labels, dataset, errors, split)
    return tuple(out)  # train_features, train_labels, test_features, test_labels


# ----------------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int = 1000,
                   imgs_per_chunk: int = 128) -> Tuple[float, float]:
    """Weighted k-NN vote (weights exp(cosine / T)) of the k nearest training features; (top1, top5) in %.

    The official vote, for test sets of any size (the official loop divides the test set into 100 chunks
    and fails below 100 images), k larger than the training set, and fewer than 5 classes.
    """
    if test_labels.numel() == 0:
        raise utils.UserError("k-NN evaluation needs at least one test image")
    if train_labels.numel() == 0:
        raise utils.UserError("k-NN evaluation needs at least one training image")
    num_classes = max(num_classes, int(train_labels.max()) + 1, int(test_labels.max()) + 1)
    k = min(k, train_features.shape[0])
    train_features_t = train_features.t()
    train_labels = train_labels.to(train_features.device)
    top1, top5, total = 0.0, 0.0, 0
    for idx in range(0, test_labels.shape[0], imgs_per_chunk):
        features = test_features[idx:idx + imgs_per_chunk].to(train_features.device)
        targets = test_labels[idx:idx + imgs_per_chunk].to(train_features.device)
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features_t)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        retrieved_neighbors = train_labels[indices]  # [B, k]
        weights = distances.div(T).exp_()
        probs = torch.zeros(batch_size, num_classes, device=weights.device, dtype=weights.dtype)
        probs.scatter_add_(1, retrieved_neighbors, weights)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k, num_classes)).sum().item()  # top5 does not make sense if k < 5
        total += batch_size
    return top1 * 100.0 / total, top5 * 100.0 / total


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, T: float = 0.07) -> Tuple[float, float]:
    """(top1, top5) of the k-NN classifier with as many classes as the labels use."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes)


# ----------------------------------------------------------------------------------------------------
# Online k-NN
# ----------------------------------------------------------------------------------------------------
def add_online_knn_args(parser: argparse.ArgumentParser) -> None:
    """The online k-NN flags of the training scripts."""
    parser.add_argument('--knn_data_path', default='', type=str, help="""Online k-NN: a folder with train/ and
        val/ ImageFolder trees (a subset is fine), or "synthetic". The 20-NN accuracy of the evaluated backbone
        (DINO: the teacher; distillation: the student) is logged as knn_top1/knn_top5 in log.txt. Empty: none.""")
    parser.add_argument('--knn_eval_freq', default=1, type=int, help="""Run the online k-NN every x epochs
        (and after the last one).""")
    parser.add_argument('--knn_eval_at_start', default=False, type=utils.bool_flag, help="""Also run the online
        k-NN (and RankMe) on the network before the first step, logged in log.txt as a record with epoch -1: the
        run's own random-initialisation baseline. Needs --knn_data_path.""")
    parser.add_argument('--knn_resize_size', default=None, type=int, help="""Online k-NN: resize of the short
        side (default: 256/224 of --knn_crop_size).""")
    parser.add_argument('--knn_crop_size', default=None, type=int, help="""Online k-NN: center-crop size
        (default: --global_crops_size).""")


def build_knn_data(args: argparse.Namespace):
    """The train/val datasets of the online k-NN (None without --knn_data_path), checked before training."""
    if not args.knn_data_path:
        return None
    crop = args.knn_crop_size or args.global_crops_size
    resize = args.knn_resize_size or int(round(crop * 256 / 224))
    train, val = data.labeled_splits(args.knn_data_path, resize, crop, cache_dir=args.output_dir)
    print(f"Online k-NN every {args.knn_eval_freq} epoch(s) on {args.knn_data_path}: {len(train)} train and "
          f"{len(val)} val images, resize {resize}, crop {crop}.")
    return train, val


def online_knn(backbone: nn.Module, knn_datasets, batch_size: int, num_workers: int, device: torch.device, autocast,
               who: str) -> Dict[str, float]:
    """20-NN accuracy of `backbone` (`who` it is) on the (train, val) `knn_datasets`; {knn_top1, knn_top5, knn_time}."""
    start = time.time()
    was_training = backbone.training
    backbone.eval()  # batch norms use their running statistics, as in eval_knn.py
    with autocast():
        train_f, train_l, test_f, test_l = compute_features(backbone, *knn_datasets, batch_size, num_workers, device)
    backbone.train(was_training)
    top1, top5 = knn_accuracy(train_f.float(), train_l, test_f.float(), test_l, k=20, T=0.07)
    print(f"Online 20-NN of the {who}: top-1 {top1:.2f}%, top-5 {top5:.2f}% ({time.time() - start:.0f} s)")
    return {"knn_top1": top1, "knn_top5": top5, "knn_time": time.time() - start}


def online_knn_callback(args: argparse.Namespace, backbone: nn.Module, autocast,
                        who: str) -> Optional[Callable[[int], Dict[str, float]]]:
    """`evaluate(epoch)` for engine.fit: the 20-NN of `backbone` every --knn_eval_freq epochs and after the
    last; None without --knn_data_path. The data is read and checked now, before any training."""
    datasets = build_knn_data(args)
    if datasets is None:
        return None

    def evaluate(epoch: int) -> Dict[str, float]:
        if (epoch + 1) % args.knn_eval_freq == 0 or epoch + 1 == args.epochs:
            return online_knn(backbone, datasets, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                              device=args.device, autocast=autocast, who=who)
        return {}
    return evaluate


# ----------------------------------------------------------------------------------------------------
# Feature files (the official names)
# ----------------------------------------------------------------------------------------------------
FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")


def dump_features(folder: str, tensors: Sequence[torch.Tensor]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, tensor in zip(FEATURE_FILES, tensors):
        checkpointing.atomic_save(tensor.cpu(), os.path.join(folder, name))
    print(f"Features written to {folder} ({', '.join(FEATURE_FILES)})")


def load_features(folder: str) -> List[torch.Tensor]:
    missing = [n for n in FEATURE_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise utils.UserError(f"--load_features {folder} lacks {', '.join(missing)}: give the folder written by "
                              "--dump_features")
    tensors = [checkpointing.load_checkpoint(os.path.join(folder, n)) for n in FEATURE_FILES]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or tensors[0].shape[0] != tensors[2].shape[0] \
            or tensors[1].shape[0] != tensors[3].shape[0] or tensors[0].shape[1] != tensors[1].shape[1]:
        raise utils.UserError(f"the feature files in {folder} do not belong together (shapes "
                              f"{[tuple(getattr(t, 'shape', ())) for t in tensors]})")
    return tensors


# ----------------------------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------------------------
def eval_knn(args: argparse.Namespace) -> List[Tuple[int, float, float]]:
    runtime.init_distributed_mode(args)
    runtime.fix_random_seeds(args.seed)  # random weights: the same on every rank and in every run
    runtime.print_run_info(args)
    if min(args.nb_knn) < 1 or args.temperature <= 0:
        raise utils.UserError("--nb_knn values must be at least 1 and --temperature positive")
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
    else:
        dataset_train, dataset_val = data.labeled_splits(args.data_path, args.resize_size, args.crop_size)
        print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")
        model = backbones.build_eval_model(args.arch, args.patch_size, args.pretrained_weights, args.checkpoint_key,
                                 args.device)
        start = time.time()
        train_features, train_labels, test_features, test_labels = compute_features(
            model, dataset_train, dataset_val, args.batch_size_per_gpu, args.num_workers, args.device,
            use_cuda=args.use_cuda)
        print(f"Features extracted in {time.time() - start:.1f} s")
        if args.dump_features and utils.is_main_process():
            dump_features(args.dump_features, (train_features, test_features, train_labels, test_labels))

    results = []
    if utils.is_main_process():
        device = args.device if args.use_cuda else torch.device("cpu")
        train_features, test_features = train_features.to(device), test_features.to(device)
        train_labels, test_labels = train_labels.to(device), test_labels.to(device)
        print("Features are ready!\nStart the k-NN classification.")
        for k in args.nb_knn:
            top1, top5 = knn_accuracy(train_features, train_labels, test_features, test_labels, k, args.temperature)
            print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
            results.append((k, top1, top5))
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser('Evaluation with weighted k-NN on ImageNet', parents=[get_args_parser()])
    runtime.run_script(eval_knn, parser.parse_args())
