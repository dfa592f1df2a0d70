#!/usr/bin/env bash
# DINO ViT-S/16 on ImageNet-100 stored as train.X1 ... train.X4 and val.X (the layout of the common Kaggle
# copy), 100 epochs on one node, then the k-NN and linear evaluations.
#
# Data:     DATA holds train.X1/ ... train.X4/ (each a share of the 100 class folders, ~126,700 images in
#           all) and val.X/ (5,000 images). Training reads the four roots as one dataset (--data_path with a
#           quoted glob: classes are merged by name); the evaluations, which read train/ and val/, get a
#           folder of links to the same class folders.
# Machine:  one node of 8 GPUs (GPUS=N for another number; the learning rate follows the total batch size).
# Expected: not measured here.
#
#   DATA=/path/to/imagenet100 bash recipes/imagenet100_vit_small.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-/path/to/imagenet100}
OUT=${OUT:-runs/imagenet100_vit_small}
GPUS=${GPUS:-8}
EVAL_DATA=$OUT/eval_data

run mkdir -p "$EVAL_DATA/train"
for class_dir in "$DATA"/train.X*/*/; do  # each class folder of every train.X root, linked into train/
    if [ -d "$class_dir" ]; then
        run ln -sfn "$(realpath -m "$class_dir")" "$EVAL_DATA/train/$(basename "$class_dir")"
    fi
done
run ln -sfn "$(realpath -m "$DATA/val.X")" "$EVAL_DATA/val"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_dino.py \
    --data_path "$DATA/train.X*" --arch vit_small --patch_size 16 --epochs 100 --warmup_epochs 10 \
    --batch_size_per_gpu 64 --out_dim 65536 --knn_data_path "$EVAL_DATA" --knn_eval_freq 10 \
    --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$EVAL_DATA"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$EVAL_DATA" \
    --lrs 0.0001 0.001 0.01 0.1 --avgpool_patchtokens both --epochs 100 --output_dir "$OUT/linear" $EXTRA
