#!/usr/bin/env bash
# recipes/cpu_laptop.sh with DINOv2's objective: the same ViT-Tiny/16, data, crops, BN head, 32 epochs and linear
# probe, plus iBOT on the masked patches of the global crops (weight 1, DINOv2's masks: half of the crops, 10-50%
# of their patches) and KoLeo on the student's CLS tokens (weight 0.1). Side by side with cpu_laptop.sh, it shows
# what the objective does on a small collection at low resolution (a 4x4 patch grid at 64 px).
#
# Data:     Imagenette (https://github.com/fastai/imagenette, any size): DATA holds train/ and val/.
# Machine:  measured on 2 cores of an AMD EPYC with AVX512-BF16 and no AMX, no GPU, with TRAIN_EXTRA="--amp_dtype
#           bf16" (2026-12-06): 52.7 min wall in all (training 52.2 min with its 33 online k-NN evaluations;
#           cpu_laptop.sh: 49.9 min). Other CPUs differ by up to 2x (cpu_laptop.sh's header): the run prints its
#           estimate after its first steps; EPOCHS=N shortens it.
# Expected: 20-NN top-1 49.4% (random initialisation 29.5%; DINO, cpu_laptop.sh: 43.6%); linear probe top-1 54.3%
#           (random 36.1%; DINO 50.4%). The online 20-NN after epochs 1, 4, 8, 12, 16, 20, 24, 28, 32: 32.9, 37.9,
#           41.1, 44.9, 46.7, 48.3, 48.7, 49.4, 49.4% (DINO: 30.0, 33.9, 37.1, 39.4, 40.8, 42.0, 43.4, 43.6, 43.6%);
#           no collapse warning.
#
#   TRAIN_EXTRA="--amp_dtype bf16" bash recipes/cpu_laptop_dinov2.sh
OUT=${OUT:-runs/imagenette_vit_tiny_cpu_dinov2}
TRAIN_EXTRA="--ibot_loss_weight 1 --koleo_loss_weight 0.1 ${TRAIN_EXTRA:-}"
source "$(dirname "$0")/cpu_laptop.sh"
