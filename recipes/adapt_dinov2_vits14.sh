#!/usr/bin/env bash
# Adapt Meta's DINOv2 ViT-S/14 (with registers) to your images without forgetting: DINOv2's own objective (DINO +
# iBOT + KoLeo, its optimizer groups), fresh DINO/iBOT heads warmed up for 2 epochs over the frozen backbone (the
# released file has no heads), then everything trains with DINOv3's Gram anchoring to the starting weights: the
# student's patch-to-patch similarities are held to those of the released backbone, which sees the global crops
# at twice their size (448 px), its patch features resized to the student's 16x16 grid (docs/training.md,
# "Adapt DINOv2 to my images").
#
# Data:     DATA, a folder of your images at any depth (no labels); KNN_DATA (optional) a labelled folder with
#           train/ and val/ for the online k-NN and the final k-NN. WEIGHTS: Meta's dinov2_vits14_reg4_pretrain.pth
#           (https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth).
# Machine:  GPUS GPUs of one node (default 1; about 20 GB at batch 64 per GPU).
# Expected: not measured here at this size. The same flags in miniature on a 2-core CPU (ViT-Tiny/16,
#           Imagenette -> CIFAR-10, docs/training.md) keep the dense probe's mIoU and RankMe that fresh heads lose.
#
#   DATA=/my/images WEIGHTS=dinov2_vits14_reg4_pretrain.pth KNN_DATA=/my/labelled bash recipes/adapt_dinov2_vits14.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-/path/to/my/images}
WEIGHTS=${WEIGHTS:-dinov2_vits14_reg4_pretrain.pth}
KNN_DATA=${KNN_DATA:-}
OUT=${OUT:-runs/adapt_dinov2_vits14}
GPUS=${GPUS:-1}
KNN_FLAGS=()
if [ -n "$KNN_DATA" ]; then KNN_FLAGS=(--knn_data_path "$KNN_DATA" --knn_eval_at_start true --knn_eval_freq 5); fi

run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_dino.py \
    --arch dinov2_vits14_reg4 --pretrained_weights "$WEIGHTS" --drop_path_rate 0.1 --drop_path_uniform true \
    --global_crops_size 224 --local_crops_size 98 --local_crops_number 8 \
    --global_crops_scale 0.32 1.0 --local_crops_scale 0.05 0.32 --out_dim 65536 --norm_last_layer false \
    --ibot_loss_weight 1.0 --koleo_loss_weight 0.1 --mask_ratio 0.1 0.5 --mask_probability 0.5 \
    --momentum_teacher 0.994 --warmup_teacher_temp 0.04 --teacher_temp 0.07 --warmup_teacher_temp_epochs 2 \
    --lr 0.0005 --min_lr 1e-6 --warmup_epochs 4 --freeze_backbone_epochs 2 --freeze_last_layer 1 \
    --layerwise_decay 0.9 --patch_embed_lr_mult 0.2 --weight_decay 0.04 --weight_decay_end 0.2 --clip_grad 3.0 \
    --gram_loss_weight 1.0 --gram_teacher start --gram_teacher_crops_size 448 \
    --batch_size_per_gpu 64 --epochs 30 --saveckp_freq 5 --data_path "$DATA" --output_dir "$OUT" \
    "${KNN_FLAGS[@]}" $EXTRA $TRAIN_EXTRA
if [ -n "$KNN_DATA" ]; then
    run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
        --arch dinov2_vits14_reg4 --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key teacher \
        --data_path "$KNN_DATA"
fi
