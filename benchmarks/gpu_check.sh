#!/usr/bin/env bash
# One GPU check of the dMoE (issue 9): install the wheels, run the GPU tests (Triton kernels and the grouped_mm path
# against the dense reference, torch.compile), then time nnU-Net's train step of ResEnc-M 3D at 128^3, batch 2:
# baseline vs dMoE with the Triton and the grouped_mm backend, eager (with --profile) and torch.compile.
#
#   benchmarks/gpu_check.sh WHEEL_DIR        # run from the project root; results in $OUT (default ./gpu_check_out)
#
# WHEEL_DIR as filled by benchmarks/gpu_wheels.sh WHEEL_DIR: a/ (SimpleITK, optional: a stub module is used without it),
# b/ (nnU-Net and friends, the plugin); optional t/ with pytest, pluggy and iniconfig wheels where pytest is missing.
# Budget ~7 minutes on an H100: every stage has its own timeout and later stages are skipped when the budget
# (BUDGET seconds, default 450) would be exceeded; COMPILE_GROUPED=1 also compiles the grouped_mm backend.
# DRY=1: the same stages on CPU with the tiny preset and the current Python (no install), to check this script.
set -u
WHEELS=${1:?give the wheel folder (benchmarks/gpu_wheels.sh WHEEL_DIR fills one)}
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${BUDGET:-450}
DRY=${DRY:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
ROOT=$PWD
SECONDS=0
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }
# run_stage NAME TIMEOUT_S COMMAND...: output to $OUT/NAME.log, status into the summary
run_stage() {
    local name=$1 limit=$2; shift 2
    if [ "$limit" -lt 30 ]; then note "[$name] skipped: budget spent (${SECONDS}s elapsed)"; return 1; fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    note "[$name] exit $rc after $((SECONDS - t0))s (limit ${limit}s)$([ $rc -eq 124 ] && echo ': TIMED OUT')"
    return $rc
}

note "gpu_check $(date -u +%FT%TZ) commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') DRY=$DRY"
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; PRESET=(-preset tiny_3d -patch 16 16 16 -b 1 -flops_size 16 16 16 --train_step); REPEATS=1
    FUSED=auto  # Triton needs CUDA
    note "[install] skipped (DRY)"
else
    DEVICE=cuda; PRESET=(-preset resenc_m_3d); REPEATS=${REPEATS:-7}; FUSED=triton
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
    pkgs=("$WHEELS"/b/*.whl)
    [ -d "$WHEELS/a" ] && pkgs+=("$WHEELS"/a/*.whl)
    if ! "$PY" -c "import pytest" 2>/dev/null && [ -d "$WHEELS/t" ]; then pkgs+=("$WHEELS"/t/*.whl); fi
    "$PY" -m pip install -q --no-index --no-deps "${pkgs[@]}" 2>&1 | tail -n 5 | tee -a "$SUMMARY"
    note "[install] exit ${PIPESTATUS[0]} (${#pkgs[@]} wheels)"
fi
if ! "$PY" -c "import SimpleITK" 2>/dev/null; then  # nnU-Net imports it at start-up; the networks never use it
    mkdir -p /tmp/gpu_check_stub/SimpleITK && touch /tmp/gpu_check_stub/SimpleITK/__init__.py
    export PYTHONPATH=/tmp/gpu_check_stub${PYTHONPATH:+:$PYTHONPATH}
    note "[install] SimpleITK stub on PYTHONPATH"
fi
"$PY" -c "import torch, triton, nnunet_dmoe, nnunetv2; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$SUMMARY"

# 1. GPU tests (kernels vs the dense reference, compile); pytest from the project root for tests/
if "$PY" -c "import pytest" 2>/dev/null; then
    run_stage tests $(( $(left) < 150 ? $(left) : 150 )) "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py
    tail -n 3 "$OUT/tests.log" | tee -a "$SUMMARY"
else
    note "[tests] skipped: pytest is not installed (put pytest, pluggy, iniconfig wheels into $WHEELS/t/)"
fi

# 2. benchmarks, from a scratch folder so that the installed plugin is used. torch.compile first: what nnU-Net
# users run by default, and the longest stage (ResEnc-M 3D at 128^3 compiles 90-120 s per network)
cd "$(mktemp -d)"
BENCH=("$PY" -m nnunet_dmoe.benchmark -device "$DEVICE" "${PRESET[@]}")
run_stage compile $(( $(left) < 300 ? $(left) : 300 )) "${BENCH[@]}" -backend $FUSED --compile \
    -repeats "$(( REPEATS > 5 ? 5 : REPEATS ))" -json "$OUT/compile.json"
run_stage eager $(( $(left) < 150 ? $(left) : 150 )) "${BENCH[@]}" -backend $FUSED grouped_mm --profile \
    -repeats "$REPEATS" -json "$OUT/eager.json"
if [ "${COMPILE_GROUPED:-0}" = 1 ]; then
    run_stage compile_grouped $(( $(left) < 300 ? $(left) : 300 )) "${BENCH[@]}" -backend grouped_mm --compile \
        -repeats "$(( REPEATS > 5 ? 5 : REPEATS ))" -json "$OUT/compile_grouped.json"
fi

# 3. compact summary: the tables of every benchmark that finished
for stage in compile eager compile_grouped; do
    [ -f "$OUT/$stage.json" ] || continue
    note ""
    note "== $stage"
    "$PY" - "$OUT/$stage.json" <<'PYEOF' | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
names = ["baseline"] + [f"dMoE {b}" for b in r["backends"]]
units = {"parameters": (1e-6, "M"), "flops": (1e-9, "GFLOP"), "forward_s": (1e3, "ms"), "train_s": (1e3, "ms"),
         "first_s": (1, "s"), "peak_bytes": (2 ** -20, "MiB")}
print(f"{r.get('gpu', r['device'])}, patch {r['patch']} x {r['batch']}, median of {r['repeats']}, compile={r['compile']}")
for key, vals in r["rows"].items():
    f, u = units[key]
    cells = [f"{names[0]} {vals[0] * f:.1f}"] + [f"{n} {v * f:.1f} ({v / vals[0]:.2f}x)" for n, v in zip(names[1:], vals[1:])]
    print(f"  {key} [{u}]: " + ", ".join(cells))
PYEOF
done
note ""
note "total ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
