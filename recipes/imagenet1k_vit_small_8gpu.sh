#!/usr/bin/env bash
# The official DINO recipe: ViT-S/16 on ImageNet-1k for 100 epochs on one node of 8 GPUs (every flag at the
# official default: batch 64 per GPU, lr 0.0005 x 512/256, 10 warmup epochs, out_dim 65536, 2 x 224 px + 8 x 96 px
# crops, teacher temperature 0.04, momentum 0.996), then the official k-NN and linear evaluations.
#
# Data:     DATA holds train/ and val/ (ImageNet-1k in the usual ImageFolder layout).
# Machine:  one node of 8 GPUs.
# Expected: not measured here. The official DINO repository reports, for this command, 69.3% 20-NN and
#           74.0% linear top-1 on the ImageNet val set, after about 1.75 days on 8 GPUs.
#
#   DATA=/path/to/imagenet bash recipes/imagenet1k_vit_small_8gpu.sh
source "$(dirname "$0")/common.sh"
DATA=${DATA:-/path/to/imagenet}
OUT=${OUT:-runs/imagenet_vit_small_100ep}
GPUS=${GPUS:-8}

run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" main_dino.py \
    --arch vit_small --data_path "$DATA/train" --output_dir "$OUT" $EXTRA $TRAIN_EXTRA
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_knn.py \
    --arch vit_small --patch_size 16 --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key teacher \
    --data_path "$DATA"
run "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" eval_linear.py \
    --arch vit_small --patch_size 16 --n_last_blocks 4 --avgpool_patchtokens false \
    --pretrained_weights "$OUT/checkpoint.pth" --checkpoint_key teacher --data_path "$DATA" \
    --output_dir "$OUT/linear" $EXTRA
