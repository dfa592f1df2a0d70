#!/usr/bin/env bash
# Distillation: Meta's DINOv3 ViT-L/16 (its original checkpoint file, frozen) into a ViT-S/16 student on
# ImageNet-1k with the DINO, iBOT, KoLeo, CLS-token and SPD losses, with the online k-NN of the student, then
# the k-NN and linear evaluations of the student.
#
# Data:     DATA holds train/ and val/ (ImageNet-1k); KNN_DATA a train/ + val/ subset for the online k-NN
#           (default: DATA itself, slower). TEACHER: dinov3_vitl16_pretrain_lvd1689m.pth (from Meta; never
#           downloaded here). Any teacher works: a main_dino.py checkpoint with
#           TEACHER_ARCH=vit_base TEACHER=runs/x/checkpoint.pth.
# Machine:  one node of 8 GPUs.
# Expected: not measured here.
#
#   DATA=/path/to/imagenet TEACHER=/path/to/dinov3_vitl16_pretrain_lvd1689m.pth \
#       bash recipes/distill_dinov3_vitl_to_vits.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-/path/to/imagenet}
KNN_DATA=${KNN_DATA:-$DATA}
TEACHER=${TEACHER:-/path/to/dinov3_vitl16_pretrain_lvd1689m.pth}
TEACHER_ARCH=${TEACHER_ARCH:-vit_large_patch16_dinov3}
OUT=${OUT:-runs/distill_vitl16_to_vits16}
GPUS=${GPUS:-8}

run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_distill.py \
    --teacher_arch "$TEACHER_ARCH" --teacher_weights "$TEACHER" --arch vit_small --patch_size 16 \
    --data_path "$DATA/train" --knn_data_path "$KNN_DATA" --knn_eval_freq 10 --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key student \
    --data_path "$DATA"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key student \
    --data_path "$DATA" --lrs 0.0001 0.001 0.01 0.1 --avgpool_patchtokens both --output_dir "$OUT/linear" $EXTRA
