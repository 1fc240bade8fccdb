#!/usr/bin/env bash
# GPU check of the fairness comparators (not run by the test suite; CPU tests cover the logic):
#  1. GroupDRO, FEBS and adversarial trainers train 1 epoch x 10 iterations on CUDA as nnU-Net runs them by default
#     (torch.compile, fp16 autocast, GradScaler), then nnU-Net's final validation;
#  2. nnUNetv2_predict with the adversarial model (two-headed network, classifier unused);
#  3. train-step time of each comparator next to the baseline and dMoE (eager: nnUNet_compile=f, so the timing does
#     not wait for five compilations).
# Usage: bash benchmarks/comparators_gpu.sh [WORK_DIR]   (about 6-9 minutes on one H100; WORK_DIR default $OUT or
# /tmp/comparators_gpu). Prints "COMPARATORS GPU CHECK PASSED" at the end.
set -euo pipefail
WORK=${1:-${OUT:-/tmp/comparators_gpu}}
BIN=$(dirname "$(command -v nnUNetv2_train)")
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
export nnUNet_def_n_proc=4 nnUNet_n_proc_DA=4
D=996
mkdir -p "$WORK"
t0=$(date +%s)
"$BIN/nnUNetv2_dmoe_make_synthetic" -d $D -dim 3 -num_train 12 -num_test 4 -size 48 48 48 -seed 5 \
    -proportions 0.5 0.5 -margins 0 2 --overwrite
"$BIN/nnUNetv2_dmoe_plan_and_preprocess" -d $D -c 3d_fullres -np 4 > "$WORK/plan.log" 2>&1
echo "[$(( $(date +%s) - t0 )) s] planned"
for m in GroupDRO FEBS Adversarial; do
    tr=nnUNetTrainer${m}_1epochs_10iters
    "$BIN/nnUNetv2_train" $D 3d_fullres 0 -tr $tr -p nnUNetDMoEPlans > "$WORK/train_$m.log" 2>&1 \
        || { tail -40 "$WORK/train_$m.log"; exit 1; }
    grep -E "Using torch.compile|GroupDRO weights|FEBS mean group weight|classifier accuracy|train_loss|Mean Validation Dice" \
        "$WORK/train_$m.log" | tail -6
    echo "[$(( $(date +%s) - t0 )) s] trained $m"
done
"$BIN/nnUNetv2_predict" -i "$nnUNet_raw/Dataset${D}_SyntheticFairness/imagesTs" -o "$WORK/pred_adv" -d $D \
    -c 3d_fullres -p nnUNetDMoEPlans -tr nnUNetTrainerAdversarial_1epochs_10iters -f 0 > "$WORK/predict.log" 2>&1 \
    || { tail -40 "$WORK/predict.log"; exit 1; }
test "$(ls "$WORK/pred_adv"/*.nii.gz | wc -l)" -eq 4
echo "[$(( $(date +%s) - t0 )) s] predicted with the adversarial model"
HERE=$(cd "$(dirname "$0")" && pwd)
nnUNet_compile=f python "$HERE/bench_comparators.py" -d $D -c 3d_fullres -p nnUNetDMoEPlans -device cuda \
    --steps 20 2>&1 | grep -A9 "^$D "
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "[$(( $(date +%s) - t0 )) s] COMPARATORS GPU CHECK PASSED"
