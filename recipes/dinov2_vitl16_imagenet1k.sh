#!/usr/bin/env bash
# DINOv2's `vitl16_short` configuration (dinov2/configs/train/vitl16_short.yaml over ssl_default_config.yaml):
# ViT-L/16 trained with DINOv2's objective (DINO + iBOT + KoLeo, LayerScale, uniform drop path 0.3, layer-wise
# decay 0.9, patch-embedding lr x 0.2, lr 0.004 scaled by sqrt(batch/1024)) on ImageNet-1k, batch 64 on each of
# 32 GPUs (4 nodes of 8), submitted to SLURM with run_with_submitit.py (requeued on time-out and preemption), then
# the k-NN and linear evaluations.
#
# DINOv2 counts an "epoch" as 1,250 iterations (OFFICIAL_EPOCH_LENGTH), whatever the data: its 100 epochs are
# 125,000 iterations of 2,048 images, 200 passes over ImageNet-1k's 1.28M images. Our epochs are passes over the
# data, so every epoch count is doubled here: --epochs 200, --warmup_epochs 20, --warmup_teacher_temp_epochs 60,
# --freeze_last_layer 2. --norm_last_layer false is DINOv2's head (a trainable weight_g).
#
# Data:     DATA holds train/ and val/ (ImageNet-1k in the usual ImageFolder layout).
# Machine:  4 nodes of 8 GPUs (NODES, GPUS to change; the learning rate follows the total batch by the
#           square-root rule).
# Expected: not measured here. DINOv2 reports 81.6% 20-NN and 82.9% linear top-1 on ImageNet-1k val for this
#           configuration, in about a day on 32 A100s (dinov2 README, "Training" section).
#
#   DATA=/path/to/imagenet PARTITION=learnfair bash recipes/dinov2_vitl16_imagenet1k.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-/path/to/imagenet}
OUT=${OUT:-runs/dinov2_vitl16_short}
NODES=${NODES:-4}
GPUS=${GPUS:-8}
PARTITION=${PARTITION:-learnfair}
ARCH=${ARCH:-vit_large}
DROP_PATH=${DROP_PATH:-0.3}

run "$PYTHON" run_with_submitit.py --nodes "$NODES" --ngpus "$GPUS" --partition "$PARTITION" --timeout 1440 \
    --job_dir "$OUT/jobs/%j" --script main_dino.py \
    --arch "$ARCH" --patch_size 16 --layerscale 1e-5 --drop_path_rate "$DROP_PATH" --drop_path_uniform true \
    --out_dim 65536 --norm_last_layer false \
    --ibot_loss_weight 1.0 --koleo_loss_weight 0.1 --mask_ratio 0.1 0.5 --mask_probability 0.5 \
    --centering centering --momentum_teacher 0.992 --warmup_teacher_temp 0.04 --teacher_temp 0.07 \
    --warmup_teacher_temp_epochs 60 --lr 0.004 --min_lr 1e-6 --warmup_epochs 20 --weight_decay 0.04 \
    --weight_decay_end 0.4 --clip_grad 3.0 --freeze_last_layer 2 --layerwise_decay 0.9 --patch_embed_lr_mult 0.2 \
    --global_crops_scale 0.32 1.0 --local_crops_scale 0.05 0.32 --local_crops_number 8 \
    --batch_size_per_gpu 64 --epochs 200 --saveckp_freq 20 \
    --data_path "$DATA/train" --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch "$ARCH" --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key teacher \
    --data_path "$DATA"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch "$ARCH" --patch_size 16 --n_last_blocks 1 --avgpool_patchtokens both \
    --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key teacher --data_path "$DATA" \
    --lrs 0.0001 0.001 0.01 0.1 --output_dir "$OUT/linear" $EXTRA
