# Sourced by every recipe: run from the repository root, pick the Python, and run or print each command.
#
#   PYTHON=/path/to/python   the interpreter (default: .venv/bin/python when it exists, else python3)
#   EXTRA="--logger tensorboard wandb"   flags appended to every training command (main_dino.py,
#                            main_distill.py, eval_linear.py), e.g. experiment tracking
#   TRAIN_EXTRA="--amp_dtype bf16"   flags appended to the pretraining command only (main_dino.py,
#                            main_distill.py), e.g. bf16 on a CPU with AVX512-BF16 or AMX (see README, Precision)
#   DRY_RUN=1                print the commands instead of running them (tests/test_recipes.py parses them)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
EXTRA=${EXTRA:-}
TRAIN_EXTRA=${TRAIN_EXTRA:-}

# run CMD ARGS...: print the command, then run it (only print it with DRY_RUN=1).
run() {
    if [ -n "${DRY_RUN:-}" ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        printf '+ %s\n' "$*" >&2
        "$@"
    fi
}
