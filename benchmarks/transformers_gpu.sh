#!/usr/bin/env bash
# GPU check of the transformer trainers (not run by the test suite; CPU tests cover the logic with tiny networks):
#  1. nnUNetTrainerTransUNetDMoE (2D, ViT-B/16 + one shared dMoE block) and nnUNetTrainerPrimusDMoE (3D, Primus-M +
#     one shared dMoE block) train 1 epoch x 10 iterations on CUDA as nnU-Net runs them by default (torch.compile,
#     fp16 autocast, GradScaler), then nnU-Net's final validation;
#  2. nnUNetv2_predict with both models on their test images;
#  3. nnU-Net's train step of TransUNet vs TransUNet + dMoE at 224x224, batch 2 (the paper's Table 7 2D row), eager:
#     nnUNetv2_dmoe_benchmark -preset transunet_2d --train_step.
# Usage: bash benchmarks/transformers_gpu.sh [WORK_DIR]   (WORK_DIR default $OUT or /tmp/transformers_gpu; expected
# 6-8 minutes on one H100, mostly the two compilations). Prints "TRANSFORMERS GPU CHECK PASSED" at the end.
# DRY=1: the same stages on CPU with tiny networks (plans' "transformer" block), to check this script.
set -euo pipefail
WORK=${1:-${OUT:-/tmp/transformers_gpu}}
DRY=${DRY:-0}
BIN=$(dirname "$(command -v nnUNetv2_train)")
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
export nnUNet_def_n_proc=4 nnUNet_n_proc_DA=4
DEVICE=cuda ITERS=10 BENCH=(-device cuda)
if [ "$DRY" = 1 ]; then
    DEVICE=cpu ITERS=5 BENCH=(-patch 32 32 -repeats 1)
    export nnUNet_def_n_proc=1 nnUNet_n_proc_DA=0 OMP_WAIT_POLICY=PASSIVE
fi
mkdir -p "$WORK"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# (dataset id, dimension, image size, configuration, trainer)
for spec in "997 2 96 2d TransUNetDMoE" "998 3 48 3d_fullres PrimusDMoE"; do
    read -r D DIM SIZE CFG NAME <<< "$spec"
    "$BIN/nnUNetv2_dmoe_make_synthetic" -d "$D" -dim "$DIM" -num_train 12 -num_test 4 \
        -size $(printf "$SIZE %.0s" $(seq "$DIM")) -seed 5 --overwrite > "$WORK/make_$D.log"
    "$BIN/nnUNetv2_dmoe_plan_and_preprocess" -d "$D" -c "$CFG" -np 4 > "$WORK/plan_$D.log" 2>&1
    if [ "$DRY" = 1 ]; then  # tiny networks in the plans' "transformer" block
        "$BIN/python" - "$nnUNet_preprocessed/Dataset${D}_SyntheticFairness/nnUNetDMoEPlans.json" "$CFG" <<'EOF'
import json, sys
path, cfg = sys.argv[1:]
plans = json.load(open(path))
tiny = {"2d": {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder": "paper", "decoder_features": [32, 16, 16, 16, 8]},
        "3d_fullres": {"embed_dim": 48, "depth": 2, "num_heads": 2}}[cfg]
plans["configurations"][cfg]["transformer"] = tiny
json.dump(plans, open(path, "w"), indent=1)
EOF
    fi
    stamp "planned dataset $D ($CFG)"
    tr=nnUNetTrainer${NAME}_1epochs_${ITERS}iters
    "$BIN/nnUNetv2_train" "$D" "$CFG" 0 -tr "$tr" -p nnUNetDMoEPlans -device "$DEVICE" > "$WORK/train_$NAME.log" 2>&1 \
        || { tail -40 "$WORK/train_$NAME.log"; exit 1; }
    grep -E "Using torch.compile|rounded to|agree for all|train_loss|Epoch time|Mean Validation Dice" \
        "$WORK/train_$NAME.log" | tail -7
    stamp "trained $NAME"
    "$BIN/nnUNetv2_predict" -i "$nnUNet_raw/Dataset${D}_SyntheticFairness/imagesTs" -o "$WORK/pred_$NAME" -d "$D" \
        -c "$CFG" -p nnUNetDMoEPlans -tr "$tr" -f 0 -device "$DEVICE" > "$WORK/predict_$NAME.log" 2>&1 \
        || { tail -40 "$WORK/predict_$NAME.log"; exit 1; }
    test "$(ls "$WORK/pred_$NAME" | grep -cE '\.(png|nii\.gz)$')" -eq 4
    stamp "predicted with $NAME"
done

"$BIN/nnUNetv2_dmoe_benchmark" -preset transunet_2d --train_step "${BENCH[@]}" 2>&1 | grep -E "^\||blocks:"
if [ "$DRY" != 1 ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi
stamp "TRANSFORMERS GPU CHECK PASSED"
