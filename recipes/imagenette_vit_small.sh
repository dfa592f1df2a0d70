#!/usr/bin/env bash
# DINO ViT-S/16 on Imagenette at full resolution (224 px global / 96 px local crops), one GPU, then the
# k-NN and linear evaluations.
#
# Data:     Imagenette (https://github.com/fastai/imagenette, full size or 320 px): DATA holds train/ and val/.
# Machine:  one GPU (GPUS=N for N GPUs of one node; the learning rate follows the total batch size).
# Expected: not measured here.
#
#   DATA=/path/to/imagenette bash recipes/imagenette_vit_small.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-../shared/data/imagenette}
OUT=${OUT:-runs/imagenette_vit_small}
GPUS=${GPUS:-1}

run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_dino.py \
    --data_path "$DATA/train" --arch vit_small --patch_size 16 --out_dim 16384 \
    --batch_size_per_gpu 128 --epochs 200 --warmup_epochs 10 \
    --knn_data_path "$DATA" --knn_eval_freq 10 --saveckp_freq 50 --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$DATA"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --data_path "$DATA" \
    --lrs 0.0001 0.001 0.01 0.1 --avgpool_patchtokens both --epochs 100 --output_dir "$OUT/linear" $EXTRA
