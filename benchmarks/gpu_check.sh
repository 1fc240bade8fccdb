#!/usr/bin/env bash
# One GPU check of the dMoE: install the wheels, run the GPU tests (Triton kernels and the grouped_mm path
# against the dense reference, torch.compile), then time nnU-Net's train step of ResEnc-M 3D at 128^3, batch 2,
# baseline vs dMoE:
#   compile  torch.compile with the default backend choice (`auto`: Triton where C <= 128, grouped_mm at the wider
#            deep stages, see resolve_backend in nnunet_dmoe/method/dmoe.py), which is what nnU-Net users run by default;
#   eager    eager, with --profile: `auto` first, then each forced backend (triton on every layer, grouped_mm), all
#            timed interleaved against one baseline;
#   compile_forced (not in the default STAGES, it does not fit in the same call): torch.compile, triton and grouped_mm.
#
#   benchmarks/gpu_check.sh WHEEL_DIR        # run from the project root; results in $OUT (default ./gpu_check_out)
#   COMMIT=$(git rev-parse HEAD) benchmarks/gpu_check.sh WHEEL_DIR   # where the copy has no .git (a device call)
#
# WHEEL_DIR as filled by benchmarks/gpu_wheels.sh WHEEL_DIR: a/ (SimpleITK, optional: a stub module is used without it),
# b/ (nnU-Net and friends, the plugin); optional t/ with pytest, pluggy and iniconfig wheels where pytest is missing.
#
# Budget: everything, install included, ends within BUDGET seconds (default 480: one 8-minute call on an H100/H200).
# Each stage runs under its own timeout, min(its cap, what is left less the floors of the stages after it and
# END_S for the summary), at least its floor where what is left allows (the order of the stages is their priority);
# a stage that cannot get its floor is skipped. Caps/floors (seconds, overridable):
#   install T_INSTALL=60, probe T_PROBE=45, tests T_TESTS=90/30, compile T_COMPILE=240/120, eager T_EAGER=150/90,
#   compile_forced T_COMPILE_FORCED=400/200; END_S=20 (timeout's 10 s kill grace and the summary).
# Expected on an H100: install + probe ~30 s, tests ~60 s, compile ~200-240 s (two networks), eager ~100 s.
# STAGES (default "tests compile eager") picks the stages; e.g. a second call STAGES=compile_forced.
#
# Results in $OUT: NAME.log and NAME.json per stage (the benchmark's -json), summary.txt (tables) and summary.json:
# per stage exit status, seconds, limit, and per dMoE backend the ratios dMoE/baseline of the train step's median
# time and of its peak memory; GPU name, torch and triton versions, the commit. summary.json is printed at the end.
# DRY=1: the same stages on CPU with the tiny preset and the current Python (no install), to check this script;
# there the forced backends are grouped_mm only (Triton needs CUDA) and torch.compile is a no-op
# (TORCH_COMPILE_DISABLE=1; DRY_COMPILE=1 compiles, which takes over 4 minutes on two CPU cores).
set -u
WHEELS=${1:?give the wheel folder (benchmarks/gpu_wheels.sh WHEEL_DIR fills one)}
ROOT=$PWD
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${BUDGET:-480}
DRY=${DRY:-0}
STAGES=" ${STAGES:-tests compile eager} "
if [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; fi
PY=${PYTHON:-python3}
T_INSTALL=${T_INSTALL:-60}; T_PROBE=${T_PROBE:-45}; END_S=${END_S:-20}
T_TESTS=${T_TESTS:-90}; F_TESTS=30
T_COMPILE=${T_COMPILE:-240}; F_COMPILE=120
T_EAGER=${T_EAGER:-150}; F_EAGER=90
T_COMPILE_FORCED=${T_COMPILE_FORCED:-400}; F_COMPILE_FORCED=200
COMMIT=${COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
SECONDS=0
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
STAGE_TSV="$OUT/stages.tsv"
: > "$SUMMARY"
: > "$STAGE_TSV"
rm -f "$OUT/summary.json" "$OUT/env.json" "$OUT/gpu.txt"
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - SECONDS)); }
wanted() { [[ "$STAGES" == *" $1 "* ]]; }
# floors of the wanted stages after NAME (time kept for them)
after() {
    local seen=0 sum=0 s
    for s in tests compile eager compile_forced; do
        if [ $seen = 1 ] && wanted $s; then
            case $s in tests) sum=$((sum + F_TESTS));; compile) sum=$((sum + F_COMPILE));;
                eager) sum=$((sum + F_EAGER));; compile_forced) sum=$((sum + F_COMPILE_FORCED));; esac
        fi
        [ $s = "$1" ] && seen=1
    done
    echo $sum
}
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGE_TSV"; }  # name rc seconds limit note
# run_stage NAME CAP FLOOR COMMAND...: output to $OUT/NAME.log, status into the summary and stages.tsv
run_stage() {
    local name=$1 cap=$2 floor=$3; shift 3
    local limit=$(( $(left) - END_S - $(after "$name") ))
    [ "$limit" -gt "$cap" ] && limit=$cap
    # stages run in order of priority: one that the later floors would squeeze below its own floor takes its floor
    [ "$limit" -lt "$floor" ] && limit=$(( $(left) - END_S < floor ? $(left) - END_S : floor ))
    rm -f "$OUT/$name.json"
    if [ "$limit" -lt "$floor" ]; then
        note "[$name] skipped: ${limit}s left for it, needs ${floor}s (${SECONDS}s elapsed of ${BUDGET}s)"
        record "$name" "" 0 "$limit" "skipped: budget"
        return 1
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local timed=""; { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && timed="timed out"
    note "[$name] exit $rc after $((SECONDS - t0))s (limit ${limit}s)${timed:+: TIMED OUT}"
    record "$name" "$rc" "$((SECONDS - t0))" "$limit" "$timed"
    return $rc
}

note "gpu_check $(date -u +%FT%TZ) commit $COMMIT DRY=$DRY BUDGET=${BUDGET}s STAGES=$STAGES"
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; PRESET=(-preset tiny_3d -patch 16 16 16 -b 1 -flops_size 16 16 16 --train_step); REPEATS=1
    FORCED=(grouped_mm)  # Triton needs CUDA
    [ "${DRY_COMPILE:-0}" = 1 ] || export TORCH_COMPILE_DISABLE=1
    note "[install] skipped (DRY); TORCH_COMPILE_DISABLE=${TORCH_COMPILE_DISABLE:-0}"
    record install "" 0 0 "skipped: DRY"
else
    DEVICE=cuda; PRESET=(-preset resenc_m_3d); REPEATS=${REPEATS:-7}; FORCED=(triton grouped_mm)
    timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
    tee -a "$SUMMARY" < "$OUT/gpu.txt"
    pkgs=("$WHEELS"/b/*.whl)
    [ -d "$WHEELS/a" ] && pkgs+=("$WHEELS"/a/*.whl)
    if ! "$PY" -c "import pytest" 2>/dev/null && [ -d "$WHEELS/t" ]; then pkgs+=("$WHEELS"/t/*.whl); fi
    t0=$SECONDS
    timeout --kill-after=5 "$T_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "${pkgs[@]}" \
        > "$OUT/install.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/install.log" | tee -a "$SUMMARY"
    note "[install] exit $rc after $((SECONDS - t0))s (${#pkgs[@]} wheels)"
    record install "$rc" "$((SECONDS - t0))" "$T_INSTALL" "$([ $rc -eq 124 ] && echo 'timed out')"
fi
if ! "$PY" -c "import SimpleITK" 2>/dev/null; then  # nnU-Net imports it at start-up; the networks never use it
    mkdir -p /tmp/gpu_check_stub/SimpleITK && touch /tmp/gpu_check_stub/SimpleITK/__init__.py
    export PYTHONPATH=/tmp/gpu_check_stub${PYTHONPATH:+:$PYTHONPATH}
    note "[install] SimpleITK stub on PYTHONPATH"
fi
# versions as the stages import them (written to env.json; the summary falls back to the installed metadata)
timeout --kill-after=5 "$T_PROBE" "$PY" - "$OUT/env.json" <<'PYEOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
env = {}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    import triton
    env["triton"] = triton.__version__
    import nnunetv2, nnunet_dmoe  # noqa: F401  (the stages need both)
    env["imports"] = "ok"
except Exception as e:  # noqa: BLE001
    env["imports"] = f"{type(e).__name__}: {e}"
json.dump(env, open(sys.argv[1], "w"))
print(" ".join(f"{k} {v}" for k, v in env.items()))
PYEOF

# 1. GPU tests (kernels vs the dense reference, compile); pytest from the project root for tests/
if wanted tests; then
    if "$PY" -c "import pytest" 2>/dev/null; then
        run_stage tests "$T_TESTS" "$F_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_gpu.py
        [ -f "$OUT/tests.log" ] && tail -n 3 "$OUT/tests.log" | tee -a "$SUMMARY"
    else
        note "[tests] skipped: pytest is not installed (put pytest, pluggy, iniconfig wheels into $WHEELS/t/)"
        record tests "" 0 0 "skipped: no pytest"
    fi
fi

# 2. benchmarks, from a scratch folder so that the installed plugin is used. The default first: torch.compile (on by
# default in nnU-Net) with `auto`; the longest stage (ResEnc-M 3D at 128^3 compiles 90-120 s per network)
cd "$(mktemp -d)"
BENCH=("$PY" -m nnunet_dmoe.commands.benchmark -device "$DEVICE" "${PRESET[@]}")
CREPEATS=$(( REPEATS > 5 ? 5 : REPEATS ))
wanted compile && run_stage compile "$T_COMPILE" "$F_COMPILE" "${BENCH[@]}" -backend auto --compile \
    -repeats "$CREPEATS" -json "$OUT/compile.json"
wanted eager && run_stage eager "$T_EAGER" "$F_EAGER" "${BENCH[@]}" -backend auto "${FORCED[@]}" --profile \
    -repeats "$REPEATS" -json "$OUT/eager.json"
wanted compile_forced && run_stage compile_forced "$T_COMPILE_FORCED" "$F_COMPILE_FORCED" "${BENCH[@]}" \
    -backend "${FORCED[@]}" --compile -repeats "$CREPEATS" -json "$OUT/compile_forced.json"
cd "$ROOT"

# 3. compact summary: the tables of every benchmark that finished
for stage in compile eager compile_forced; do
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

# 4. summary.json (no torch import: a second or two)
"$PY" - "$OUT" "$COMMIT" "$DRY" "$BUDGET" "$SECONDS" <<'PYEOF'
import json, os, sys
from importlib import metadata

out, commit, dry, budget, elapsed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def version(*dists):
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            pass
    return None


env = load("env.json") or {}
gpu_line = None
if os.path.exists(os.path.join(out, "gpu.txt")):
    gpu_line = open(os.path.join(out, "gpu.txt")).read().strip().splitlines()[:1]
    gpu_line = gpu_line[0] if gpu_line else None
smi = [s.strip() for s in gpu_line.split(",")] if gpu_line and "," in gpu_line else []
summary = {
    "commit": commit, "dry": dry, "budget_s": budget, "elapsed_s": elapsed,
    "gpu": env.get("gpu") or (smi[0] if smi else None),
    "gpu_memory": smi[1] if len(smi) > 1 else None, "driver": smi[2] if len(smi) > 2 else None,
    "torch": env.get("torch") or version("torch"), "cuda": env.get("cuda"),
    "triton": env.get("triton") or version("triton", "pytorch-triton"),
    "nnunetv2": version("nnunetv2"), "nnunet_dmoe": version("nnunet_dmoe", "nnunet-dmoe"),
    "imports": env.get("imports"), "torch_compile_disabled": os.environ.get("TORCH_COMPILE_DISABLE") == "1",
    "target_ratio": 1.35, "stages": {},
}
with open(os.path.join(out, "stages.tsv")) as f:
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
for name, rc, secs, limit, note in rows:
    st = {"exit": int(rc) if rc else None, "seconds": int(secs), "limit_s": int(limit),
          "timed_out": note == "timed out"}
    if note.startswith("skipped"):
        st["skipped"] = note.split(": ", 1)[-1]
    if name == "tests" and rc:
        lines = [ln for ln in open(os.path.join(out, "tests.log"), errors="replace").read().splitlines() if ln.strip()]
        st["result"] = lines[-1] if lines else None
    r = load(f"{name}.json") if name not in ("install", "tests") and rc == "0" else None
    if r is not None:
        rw = r["rows"]
        st.update(device=r.get("gpu", r["device"]), patch=r["patch"], batch=r["batch"], repeats=r["repeats"],
                  compile=r["compile"], train_step=r["train_step"])
        st["baseline"] = {"train_step_ms": round(rw["train_s"][0] * 1e3, 2),
                          "peak_memory_mib": round(rw["peak_bytes"][0] / 2 ** 20, 1)}
        st["backends"] = {
            b: {"train_step_ratio": round(rw["train_s"][i] / rw["train_s"][0], 3),
                "peak_memory_ratio": round(rw["peak_bytes"][i] / rw["peak_bytes"][0], 3),
                "train_step_ms": round(rw["train_s"][i] * 1e3, 2),
                "peak_memory_mib": round(rw["peak_bytes"][i] / 2 ** 20, 1),
                "first_step_s": round(rw["first_s"][i], 2)}
            for i, b in enumerate(r["backends"], start=1)}
    summary["stages"][name] = st
tmp = os.path.join(out, "summary.json.tmp")
with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
os.replace(tmp, os.path.join(out, "summary.json"))
PYEOF
note ""
note "total ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo "== summary.json"
cat "$OUT/summary.json"; echo
