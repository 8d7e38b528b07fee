#!/usr/bin/env bash
# The GPU check: one call proves correctness on the device and produces every figure, in under 8 minutes on one
# H200 (the stage limits add up to 450 s, and each stage is cut to what is left of GPU_CHECK_BUDGET, counted from
# the start, installation included).
#
#   bash benchmarks/gpu_check.sh OUT_DIR              on the GPU machine (the image's python3 is enough: repbend is
#                                                     installed with pip install --no-deps -e ., or imported from
#                                                     the tree where pip cannot)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    every stage that can run on the CPU, at tiny sizes
#
# Stages (each one process, under `timeout`; each writes JSON lines to OUT_DIR/results.jsonl as results come):
#   env        benchmarks/gpu_env.py        versions, device, optional packages; whether Triton can build its
#                                           launchers (C compiler, Python.h) and launch a kernel: if not, every
#                                           later stage runs with REPBEND_KERNELS=torch (said in one line)
#   parity     benchmarks/gpu_parity.py     every kernel path the trainer uses, Triton vs eager vs float64
#   attention  benchmarks/gpu_attention.py  packed = unpacked (loss, gradients) on every attention backend present
#                                           but flex_attention (its cold compile takes 20-40 s a dtype)
#   kernels    benchmarks/gpu_kernels.py    rep_distance fwd+bwd bandwidth vs a device copy, calls back to back and
#                                           the kernels' profiler time (+ bench_kernels.py's)
#   step       benchmarks/bench_step.py     Llama-3-8B-shaped step: every method of benchmarks/methods.py against its
#                                           reference re-creation (tokens/s, peak GiB allocated and reserved, MFU,
#                                           same loss), one worker and one model build per method; beside each
#                                           measured peak, the plan's prediction
#   dist       benchmarks/gpu_dist.py       ddp and fsdp training runs under torchrun --nproc_per_node 1
#   flex       benchmarks/gpu_attention.py --only flex_attention, with a minute left
#   kernel_tests  pytest of the kernel tests on CUDA, only with time left and pytest installed
# Meanwhile `python -m repbend.plan.bench` plans the step's variants on fake tensors on the CPUs (OUT_DIR/step/
# plan.json), which the step stage prints beside its measurements.
# then benchmarks/gpu_summary.py prints the stage table, the step table and the goal table (last).
# OUT_DIR ends up with results.jsonl, gpu_check.log (this whole console), summary.txt (rewritten after every stage),
# bench_kernels.csv, and step/ (the step stage's table, results.json and .csv, each worker's log, the plan and its
# log, step_bench.png when matplotlib is installed): every result stays under OUT_DIR; only caches are temporary.
# Environment: PYTHON (default python3; .venv/bin/python in a dry run when present), GPU_CHECK_BUDGET (seconds,
# default 450; dry run 300).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-bench_out/gpu_check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
J=$OUT_DIR/results.jsonl
: > "$J"
: > "$OUT_DIR/gpu_check.log"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
TEE_PID=$!
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PLAN_PID=
cleanup() { [ -n "$PLAN_PID" ] && kill $PLAN_PID 2> /dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
T0=$SECONDS
if [ $DRY = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-300}; else BUDGET=${GPU_CHECK_BUDGET:-450}; fi
RESERVE=8  # seconds kept for the summary
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HOME="$WORK/hf" TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton}" \
       TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ $DRY = 1 ] && echo 1 || echo 8)}
unset TRITON_INTERPRET
declare -A RC
ORDER=()
if ! command -v timeout > /dev/null; then  # no coreutils timeout: a plain one (kills the command, not its children)
    timeout() {
        [[ $1 == --kill-after=* ]] && shift
        local limit=$1; shift
        "$@" &
        local pid=$!
        ( sleep "$limit"; kill -TERM $pid 2> /dev/null; sleep 5; kill -KILL $pid 2> /dev/null ) &
        local watcher=$!
        wait $pid
        local rc=$?
        kill $watcher 2> /dev/null
        return $rc
    }
fi

now() { echo $((SECONDS - T0)); }
line() {  # line STAGE NAME STATUS SECONDS ERROR: a JSON line written by the script itself
    printf '{"stage": "%s", "name": "%s", "status": "%s", "t": %s, "error": "%s"}\n' "$1" "$2" "$3" "$4" \
        "$(printf '%s' "$5" | tr '"\\\n' "'/ ")" >> "$J"
}
stage_end() {  # stage_end STAGE EXIT SECONDS: how a stage ended (the summary's exit and time columns)
    printf '{"stage": "%s", "name": "stage_end", "status": "ok", "t": %s, "exit": "%s"}\n' "$1" "$3" "$2" >> "$J"
}
summary() {  # the report from results.jsonl
    "$PY" benchmarks/gpu_summary.py "$J" $([ $DRY = 1 ] && echo --dry-run) --out "$OUT_DIR/summary.txt"
}
stage() {  # stage NAME LIMIT_S CMD...: run under timeout (cut to the budget left), record how it ended
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - $(now) - RESERVE))
    [ "$limit" -gt "$left" ] && limit=$left
    ORDER+=("$name")
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: not run (${left}s of the ${BUDGET}s budget left)"
        line "$name" stage skipped 0 "budget spent before the stage"
        stage_end "$name" skipped 0
        RC[$name]=skipped
        return
    fi
    echo "=== $name (limit ${limit}s, at $(now)s): $*"
    local t=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    RC[$name]=$rc
    if [ $rc = 124 ] || [ $rc = 137 ]; then line "$name" stage timeout $((SECONDS - t)) "killed after ${limit}s"; fi
    stage_end "$name" $rc $((SECONDS - t))
    echo "=== $name: exit $rc in $((SECONDS - t))s"
    summary > /dev/null 2>&1
}
limit_for() {  # limit_for S: S, or the budget left if less
    local left=$((BUDGET - $(now) - RESERVE))
    echo $(( $1 < left ? $1 : left ))
}

echo "=== gpu_check $([ $DRY = 1 ] && echo '(dry run) ')at $(date -u +%FT%TZ): python $PY, output $OUT_DIR," \
     "budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null \
    || echo "(no nvidia-smi)"
if ! "$PY" -c "import repbend.kernels, repbend.loss" 2>/dev/null; then
    echo "=== installing repbend: pip install --no-deps -e . (no index, no build isolation)"
    if ! timeout 60 "$PY" -m pip install -q --no-deps --no-index --no-build-isolation -e . \
        || ! "$PY" -c "import repbend.kernels, repbend.loss" 2>/dev/null; then
        echo "=== pip could not install repbend: importing it from the tree"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

if [ $DRY = 1 ]; then
    DEV=cpu; INTERP="env TRITON_INTERPRET=1"; SMALL=--small
else
    DEV=cuda; INTERP=""; SMALL=""
fi

STEP_OUT=$OUT_DIR/step
mkdir -p "$STEP_OUT"
if [ $DRY = 1 ]; then
    # each method of benchmarks/methods.py: its shipped variant and its reference
    STEP_VARIANTS=$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import methods; print(",".join(v for m in methods.BENCH.values() for v in (m.variants[0], m.references[0])))' "$ROOT/benchmarks") \
        || { echo "=== cannot read the methods of benchmarks/methods.py" >&2; exit 1; }
    PLAN_ARGS="--model tiny --device cpu --scale 0.125 --warmup 1 --steps 1 --variants $STEP_VARIANTS"
else
    PLAN_ARGS="--model llama3-8b --device cuda --warmup 1 --steps 2"
fi
# the plan of the step stage's variants, on one CPU core while the GPU works (the step stage reads it at its end)
OMP_NUM_THREADS=1 "$PY" -m repbend.plan.bench $PLAN_ARGS --output "$STEP_OUT/plan.json" > "$STEP_OUT/plan.log" 2>&1 &
PLAN_PID=$!

stage env 25 "$PY" benchmarks/gpu_env.py --jsonl "$J" --impl-file "$WORK/kernels_impl"
if [ "$(cat "$WORK/kernels_impl" 2>/dev/null)" = torch ]; then
    export REPBEND_KERNELS=torch
    echo "=== Triton cannot build or launch its kernels here (see the env line): the stages run impl=torch"
fi

# each stage's own (soft) time limit sits a little under the hard one: what does not fit is recorded as skipped
L=$(limit_for 70)
stage parity $L $INTERP "$PY" benchmarks/gpu_parity.py --device $DEV $SMALL --jsonl "$J" --time-limit $((L - 8))

# flex_attention compiles cold for 20-40 s a dtype: its own stage, last, when time is left
L=$(limit_for 55)
stage attention $L "$PY" benchmarks/gpu_attention.py --device $DEV --jsonl "$J" --time-limit $((L - 8)) \
    --skip flex_attention

L=$(limit_for 55)
stage kernels $L $INTERP "$PY" benchmarks/gpu_kernels.py --device $DEV $SMALL --jsonl "$J" --csv-out "$OUT_DIR" \
    --time-limit $((L - 8))

if [ $DRY = 1 ]; then
    STEP_ARGS="--model tiny --device cpu --scale 0.125 --steps 1 --warmup 1 --in-process --variants $STEP_VARIANTS"
else
    STEP_ARGS="--model llama3-8b --device cuda --steps 2 --warmup 1 --worker-timeout 110"
fi
L=$(limit_for 200)
stage step $L "$PY" benchmarks/bench_step.py $STEP_ARGS --time-budget $((L - 12)) --output "$STEP_OUT" --jsonl "$J" \
    --plan-from "$STEP_OUT/plan.json" --plan-wait 20
[ -f "$STEP_OUT/table.txt" ] && cat "$STEP_OUT/table.txt"

L=$(limit_for 45)
stage dist $L "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_dist.py --jsonl "$J" \
    --time-limit $((L - 8)) --work "$WORK/dist" $([ $DRY = 1 ] && echo "--methods repbend --steps 2")

left=$((BUDGET - $(now) - RESERVE))
if [ $DRY = 1 ]; then
    line flex flex_attention skipped 0 "dry run: its CPU compile takes ~20 s; tests/test_attention_layouts.py covers it"
elif [ $left -lt 60 ]; then
    line flex flex_attention skipped 0 "${left}s left: a flex_attention compile takes 20-40 s a dtype"
else
    stage flex $((left - 10)) "$PY" benchmarks/gpu_attention.py --device $DEV --jsonl "$J" \
        --time-limit $((left - 18)) --only flex_attention
fi
kill $PLAN_PID 2>/dev/null  # a plan still running has nothing left to inform

left=$((BUDGET - $(now) - RESERVE))
if [ $DRY = 1 ]; then
    line kernel_tests pytest skipped 0 "dry run: the suite runs these tests on the CPU"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
    line kernel_tests pytest skipped 0 "pytest is not installed"
elif [ $left -lt 40 ]; then
    line kernel_tests pytest skipped 0 "${left}s left"
else
    stage kernel_tests $((left - 2)) "$PY" -m pytest -q -x -p no:cacheprovider tests/test_rep_distance.py \
        tests/test_pairwise_cosine.py tests/test_linear_kl.py
    case "${RC[kernel_tests]}" in
        0) line kernel_tests pytest ok 0 "" ;;
        124|137) ;;
        *) line kernel_tests pytest fail 0 "pytest exit ${RC[kernel_tests]}: see gpu_check.log" ;;
    esac
fi

echo
summary
STATUS=0
for k in "${ORDER[@]}"; do
    case "${RC[$k]}" in 0|skipped) ;; *) STATUS=1 ;; esac
done
echo "=== gpu_check done in $(now)s, exit $STATUS"
exec 1>&- 2>&-
wait $TEE_PID 2>/dev/null
exit $STATUS
