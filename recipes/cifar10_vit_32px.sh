#!/usr/bin/env bash
# DINO on CIFAR-10 at its native 32 px: ViT-S/4 (8x8 patches of 4 px) with 32 px global and 16 px local crops,
# then the k-NN and linear evaluations at 32 px.
#
# Data:     CIFAR-10 as image folders: DATA holds train/ (50,000 images) and test/ (10,000), one sub-folder per
#           class. The evaluations read train/ and val/: the test split is linked as val/ below.
# Machine:  one GPU (GPUS=N for N GPUs of one node).
# Expected: not measured here.
#
#   DATA=/path/to/cifar10 bash recipes/cifar10_vit_32px.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/cifar10_vit_small_p4}
GPUS=${GPUS:-1}
EVAL_DATA=$OUT/eval_data  # train/ and val/ (= test/) as links, for the k-NN and linear evaluations

run mkdir -p "$EVAL_DATA"
run ln -sfn "$(realpath -m "$DATA/train")" "$EVAL_DATA/train"
run ln -sfn "$(realpath -m "$DATA/test")" "$EVAL_DATA/val"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_dino.py \
    --data_path "$DATA/train" --arch vit_small --patch_size 4 --global_crops_size 32 --local_crops_size 16 \
    --local_crops_number 6 --out_dim 16384 --batch_size_per_gpu 256 --epochs 200 --warmup_epochs 10 \
    --knn_data_path "$EVAL_DATA" --knn_resize_size 32 --knn_crop_size 32 --knn_eval_freq 10 \
    --saveckp_freq 50 --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch vit_small --patch_size 4 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$EVAL_DATA" \
    --resize_size 32 --crop_size 32
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch vit_small --patch_size 4 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$EVAL_DATA" \
    --resize_size 32 --crop_size 32 --lrs 0.0001 0.001 0.01 0.1 --avgpool_patchtokens both --epochs 100 \
    --output_dir "$OUT/linear" $EXTRA
