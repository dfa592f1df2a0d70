#!/usr/bin/env bash
# Continued pretraining without forgetting, in miniature on a CPU (docs/training.md, "Adapt DINOv2 to my images"):
# a DINOv2-objective ViT-Tiny/16 trained on Imagenette (BASE: the checkpoint of recipes/cpu_laptop_dinov2.sh),
# exported without heads, continued for 6 epochs on 10,000 CIFAR-10 images in six ways (two learning rates x fresh
# heads at once / a 1-epoch head warm-up / warm-up + Gram anchoring to the starting weights), then each teacher's
# 20-NN on Imagenette and CIFAR-10, RankMe of those features and the dense probe on the shapes. Prints one line per
# run; about 2 h 30 min on 2 cores (11 min per training run, 5 min per evaluation).
#
#   BASE=runs/imagenette_vit_tiny_cpu_dinov2/checkpoint.pth OUT=runs/adapt_cpu bash benchmarks/adapt_cpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-runs/imagenette_vit_tiny_cpu_dinov2/checkpoint.pth}
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/adapt_cpu}
mkdir -p "$OUT"

# the base without heads (as Meta's files), CIFAR-10's folders: 1,000 train images per class (the unlabeled
# training set), 500 + 200 per class for the online k-NN, and train/ + test/ as train/ + val/ for the final k-NN
"$PYTHON" export_backbone.py "$BASE" "$OUT/base_backbone.pth"
"$PYTHON" - "$DATA/cifar10" "$OUT" <<'PY'
import os, random, sys
src, out = sys.argv[1:]
random.seed(0)
def link(split, n, dst):
    for c in sorted(os.listdir(f"{src}/{split}")):
        files = sorted(os.listdir(f"{src}/{split}/{c}"))
        random.shuffle(files)
        os.makedirs(f"{out}/{dst}/{c}", exist_ok=True)
        for f in files[:n]:
            if not os.path.lexists(f"{out}/{dst}/{c}/{f}"):
                os.symlink(os.path.abspath(f"{src}/{split}/{c}/{f}"), f"{out}/{dst}/{c}/{f}")
link("train", 1000, "cifar10k"); link("train", 500, "cifar_knn/train"); link("test", 200, "cifar_knn/val")
os.makedirs(f"{out}/cifar_full", exist_ok=True)
for a, b in (("train", "train"), ("test", "val")):
    if not os.path.lexists(f"{out}/cifar_full/{b}"):
        os.symlink(os.path.abspath(f"{src}/{a}"), f"{out}/cifar_full/{b}")
PY

train() {  # NAME FLAGS...
    local name=$1; shift
    "$PYTHON" main_dino.py --data_path "$OUT/cifar10k" --arch vit_tiny --patch_size 16 --global_crops_size 64 \
        --local_crops_size 32 --local_crops_number 6 --out_dim 4096 --batch_size_per_gpu 64 --momentum_teacher 0.99 \
        --use_bn_in_head true --epochs 6 --num_workers 2 --ibot_loss_weight 1 --koleo_loss_weight 0.1 \
        --amp_dtype bf16 --pretrained_weights "$OUT/base_backbone.pth" --knn_data_path "$OUT/cifar_knn" \
        --knn_eval_at_start true --output_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
evaluate() {  # NAME WEIGHTS
    local name=$1 weights=$2 e="$OUT/eval_$1"
    local common=(--arch vit_tiny --patch_size 16 --pretrained_weights "$weights" --nb_knn 20 --resize_size 73
                  --crop_size 64 --batch_size_per_gpu 256 --num_workers 2)
    "$PYTHON" eval_knn.py "${common[@]}" --data_path "$DATA/imagenette" --dump_features "$e/imagenette" > "$e.log" 2>&1
    "$PYTHON" eval_knn.py "${common[@]}" --data_path "$OUT/cifar_full" --dump_features "$e/cifar" >> "$e.log" 2>&1
    "$PYTHON" eval_segmentation.py --arch vit_tiny --patch_size 16 --pretrained_weights "$weights" \
        --data_path synthetic --resize_size 128 --crop_size 128 --epochs 10 --lrs 1e-2 --batch_size_per_gpu 32 \
        --use_fp16 true --amp_dtype bf16 --num_workers 2 --output_dir "$e/seg" >> "$e.log" 2>&1
    "$PYTHON" - "$e" "$name" <<'PY'
import re, sys, torch
sys.path.insert(0, ".")
import health
e, name = sys.argv[1:]
log = open(e + ".log").read()
knn = re.findall(r"20-NN classifier result: Top1: ([\d.]+)", log)
miou = re.findall(r"Best head \S+: mIoU ([\d.]+)", log)[-1]
ranks = [health.rankme(torch.load(f"{e}/{d}/testfeat.pth").float()) for d in ("imagenette", "cifar")]
print(f"{name}: Imagenette 20-NN {float(knn[0]):.2f} | CIFAR-10 20-NN {float(knn[1]):.2f} | RankMe "
      f"{ranks[0]:.1f} / {ranks[1]:.1f} | shapes mIoU {miou}")
PY
}

evaluate base "$OUT/base_backbone.pth"
for lr in "gentle --lr 0.001 --warmup_epochs 2" "hot --lr 0.004 --warmup_epochs 0"; do
    set -- $lr; tag=$1; shift
    train "fresh_heads_$tag" "$@"
    train "warmup_$tag" "$@" --freeze_backbone_epochs 1
    train "warmup_gram_$tag" "$@" --freeze_backbone_epochs 1 --gram_loss_weight 1 --gram_teacher start
    for name in "fresh_heads_$tag" "warmup_$tag" "warmup_gram_$tag"; do
        evaluate "$name" "$OUT/$name/checkpoint.pth"
    done
done
