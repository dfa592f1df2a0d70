#!/usr/bin/env bash
# recipes/dinov2_vitl16_imagenet1k.sh for a ViT-S/16 (drop path 0.1, as DINO's ViT-S; everything else DINOv2's
# `vitl16_short` configuration, with our epochs being passes over the data: see that file's header), on 4 nodes
# of 8 GPUs through SLURM, then the k-NN and linear evaluations.
#
# Data:     DATA holds train/ and val/ (ImageNet-1k in the usual ImageFolder layout).
# Machine:  4 nodes of 8 GPUs (NODES=1 for one node: the learning rate follows the total batch).
# Expected: not measured here. DINOv2 trains no ViT-S from scratch (its ViT-S/14 is distilled from ViT-g); for
#           comparison, the official DINO ViT-S/16 reaches 74.5% 20-NN / 77.0% linear after 800 epochs.
#
#   DATA=/path/to/imagenet PARTITION=learnfair bash recipes/dinov2_vits16_imagenet1k.sh
ARCH=vit_small DROP_PATH=0.1 OUT=${OUT:-runs/dinov2_vits16_short} source "$(dirname "$0")/dinov2_vitl16_imagenet1k.sh"
