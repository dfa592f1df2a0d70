#!/usr/bin/env bash
# DINO with a ResNet-50 backbone (torchvision, random initialisation) on Imagenette at 224 px, with the
# official DINO ResNet-50 settings (SGD, constant weight decay 1e-4, wider crop scales), then the k-NN and
# linear evaluations (the linear head sees the 2048-d pooled feature).
#
# Data:     Imagenette (https://github.com/fastai/imagenette, full size or 320 px): DATA holds train/ and val/.
# Machine:  one GPU (GPUS=N for N GPUs of one node).
# Expected: not measured here.
#
#   DATA=/path/to/imagenette bash recipes/imagenette_resnet50.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-../shared/data/imagenette}
OUT=${OUT:-runs/imagenette_resnet50}
GPUS=${GPUS:-1}

run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_dino.py \
    --data_path "$DATA/train" --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 \
    --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 --out_dim 16384 \
    --batch_size_per_gpu 128 --epochs 200 --warmup_epochs 10 \
    --knn_data_path "$DATA" --knn_eval_freq 10 --saveckp_freq 50 --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch resnet50 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$DATA"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch resnet50 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$DATA" \
    --lrs 0.001 0.01 0.1 1.0 --epochs 100 --output_dir "$OUT/linear" $EXTRA
