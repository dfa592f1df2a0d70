#!/usr/bin/env bash
# DINO on a laptop CPU: ViT-Tiny/16 on Imagenette at 64 px (global) / 32 px (local) crops, 15 epochs, then
# the k-NN and linear evaluations at the same resolution. Learns features clearly better than random ones.
#
# Data:     Imagenette (https://github.com/fastai/imagenette, any size): DATA holds train/ and val/
#           (10 classes, 9,469 + 3,925 images).
# Machine:  measured on 2 CPU cores, no GPU (2026-11-22).
# Expected: 20-NN top-1 34.7% (random initialisation: 29.7%); linear probe top-1 45.2% (random: 36.1%).
#           Training took 72 min wall on a machine shared with other jobs (about 55 min without them); the
#           two evaluations take a few minutes more. The online k-NN after epochs 3, 6, 9, 12, 15:
#           30.9, 33.1, 33.7, 35.0, 34.7%.
#           With TRAIN_EXTRA="--amp_dtype bf16" (CPUs with AVX512-BF16 or AMX; 2026-11-23, same machine):
#           training 49.8 min instead of 68.7, online k-NN 31.1, 33.2, 33.9, 34.3, 34.7%.
#
#   bash recipes/cpu_laptop.sh            DATA=/path/to/imagenette OUT=runs/x bash recipes/cpu_laptop.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-../shared/data/imagenette}
OUT=${OUT:-runs/imagenette_vit_tiny_cpu}

run "$PYTHON" main_dino.py --data_path "$DATA/train" --arch vit_tiny --patch_size 16 \
    --global_crops_size 64 --local_crops_size 32 --local_crops_number 6 --out_dim 4096 --batch_size_per_gpu 64 \
    --lr 0.002 --warmup_epochs 2 --momentum_teacher 0.99 --epochs 15 --num_workers 2 \
    --knn_data_path "$DATA" --knn_eval_freq 3 --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" eval_knn.py --arch vit_tiny --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" \
    --data_path "$DATA" --resize_size 73 --crop_size 64
run "$PYTHON" eval_linear.py --arch vit_tiny --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" \
    --data_path "$DATA" --resize_size 73 --crop_size 64 --cache_features \
    --lrs 0.001 0.01 0.1 --avgpool_patchtokens both --epochs 100 --batch_size_per_gpu 256 \
    --output_dir "$OUT/linear" $EXTRA
