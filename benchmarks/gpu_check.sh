#!/usr/bin/env bash
# The GPU check, one script, under 10 minutes on one H200 (the stage time limits add up to 9 min 10 s):
#   1. the kernel tests (pytest tests/test_rep_distance.py tests/test_pairwise_cosine.py tests/test_linear_kl.py)
#   2. a CUDA parity check of the three kernels: impl="triton" (compiled) against impl="torch" on the GPU
#   3. the kernel benchmark: benchmarks/bench_kernels.py --device cuda
#   4. the end-to-end step benchmark: benchmarks/bench_step.py --model llama3-8b (few steps, each variant in its
#      own process, the reference may be recorded as "oom")
# then prints the tables last. Everything lands in OUT_DIR (default bench_out/gpu_check).
#
#   benchmarks/gpu_check.sh [OUT_DIR]              on the GPU machine
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]    the same commands on the CPU at tiny sizes (tests the script)
#
# Note on stage 1: those tests build CPU tensors and run the Triton kernels in Triton's interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 when it is unset), so they exercise no CUDA code; they are run as they are, with
# TRITON_INTERPRET unset. Stage 2 is what checks the compiled kernels on the GPU; stage 4 checks them again end to end
# (repbend's loss, computed with them, against the reference recipe's plain-PyTorch loss).
# Environment: PYTHON (default .venv/bin/python, else python), KERNEL_BENCH_ARGS (extra bench_kernels.py flags, e.g.
# --quick), STEP_BENCH_ARGS (extra bench_step.py flags), T_TESTS / T_PARITY / T_KERNELS / T_STEP (stage limits, s).
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-bench_out/gpu_check}
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
unset TRITON_INTERPRET
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

T_TESTS=${T_TESTS:-90}; T_PARITY=${T_PARITY:-80}; T_KERNELS=${T_KERNELS:-110}; T_STEP=${T_STEP:-270}
if [ $DRY = 1 ]; then
    DEVICE=cpu
    KERNEL_ARGS="--device cpu --quick ${KERNEL_BENCH_ARGS:-}"
    STEP_ARGS="--model tiny --device cpu --steps 1 --warmup 1 --scale 0.125 --time-budget $((T_STEP - 15)) ${STEP_BENCH_ARGS:-}"
    PARITY_ENV="TRITON_INTERPRET=1"
else
    DEVICE=cuda
    KERNEL_ARGS="--device cuda ${KERNEL_BENCH_ARGS:-}"
    STEP_ARGS="--model llama3-8b --device cuda --steps 2 --warmup 2 --batch-size 4 --worker-timeout 150 --time-budget $((T_STEP - 15)) ${STEP_BENCH_ARGS:-}"
    PARITY_ENV="TRITON_INTERPRET=0"
fi
declare -A RC

stage() {  # stage NAME LIMIT_S LOG CMD...: run with a time limit, output to the console and LOG
    local name=$1 limit=$2 log=$3; shift 3
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    RC[$name]=${PIPESTATUS[0]}
    echo "=== $name: exit ${RC[$name]} in $((SECONDS - t0))s"
}

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY - <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device available: {torch.cuda.is_available()}, "
      f"flash_attn: {bool(importlib.util.find_spec('flash_attn'))}, triton: {bool(importlib.util.find_spec('triton'))}")
EOF
if ! $PY -c "import repbend.kernels" 2>/dev/null; then
    echo "repbend is not installed here: pip install --no-deps -e ."
    $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "install failed; the stages below will say why"
fi

stage kernel_tests "$T_TESTS" "$OUT/kernel_tests.log" \
    $PY -m pytest -q -p no:cacheprovider tests/test_rep_distance.py tests/test_pairwise_cosine.py tests/test_linear_kl.py

cat > "$OUT/parity.py" <<'EOF'
"""impl="triton" against impl="torch" on one device, fp32 and bf16, forward values and input gradients."""
import sys

import torch

from repbend.kernels import linear_kl, pairwise_cosine_loss, rep_distance

device, small = sys.argv[1], sys.argv[2] == "small"
D, V, T = (64, 1000, 16) if small else (4096, 128256, 512)
L, B, N = (3, 2, 8) if small else (11, 8, 16)
g = torch.Generator(device="cpu").manual_seed(0)
tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
failed = 0


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare(name, fn, inputs, dtype):
    global failed
    outs = {}
    for impl in ("torch", "triton"):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point() and i == 0) for i, x in enumerate(inputs)]
        y = fn(*xs, impl)
        y.backward()
        outs[impl] = (y.detach(), xs[0].grad)
    e_val, e_grad = rel(outs["triton"][0], outs["torch"][0]), rel(outs["triton"][1], outs["torch"][1])
    ok = e_val <= tol[dtype] and e_grad <= tol[dtype]
    failed += not ok
    print(f"  {name:15s} {str(dtype):15s} value rel err {e_val:.1e}  grad rel err {e_grad:.1e}  {'ok' if ok else 'FAIL'}")


def randn(*shape, dtype):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


for dtype in (torch.float32, torch.bfloat16):
    h, r = randn(L, B, T, D, dtype=dtype), randn(L, B, T, D, dtype=dtype)
    mask = (torch.rand(B, T, generator=g) < 0.6).to(device)
    compare("rep_distance", lambda h, r, m, impl: rep_distance(h, r, m, impl=impl).l2.sum(), [h, r, mask], dtype)
    compare("pairwise_cosine", lambda x, impl: pairwise_cosine_loss(x, impl=impl), [randn(L, N, D, dtype=dtype)], dtype)
    ref = randn(N * 16, D, dtype=dtype)
    w = randn(V, D, dtype=dtype) / D**0.5
    compare("linear_kl", lambda x, r, w, impl: linear_kl(x, r, w, 2.0, impl=impl),
            [ref + 0.3 * randn(N * 16, D, dtype=dtype), ref, w], dtype)
print("parity: " + ("OK" if not failed else f"{failed} FAILED"))
sys.exit(1 if failed else 0)
EOF
stage cuda_parity "$T_PARITY" "$OUT/parity.log" env $PARITY_ENV $PY "$OUT/parity.py" "$DEVICE" \
    "$([ $DRY = 1 ] && echo small || echo full)"

if [ -f benchmarks/bench_kernels.py ]; then
    stage kernel_bench "$T_KERNELS" "$OUT/kernel_bench.log" \
        $PY benchmarks/bench_kernels.py $KERNEL_ARGS --output "$OUT/kernels"
else
    echo "=== kernel_bench: benchmarks/bench_kernels.py is not in this tree; skipped"; RC[kernel_bench]=skipped
fi

stage step_bench "$T_STEP" "$OUT/step_bench.log" \
    $PY benchmarks/bench_step.py $STEP_ARGS --output "$OUT/step"

echo
echo "################ tables ################"
echo "--- kernel tests (CPU tensors, Triton interpreter): $(grep -E '(passed|failed|error)' "$OUT/kernel_tests.log" | tail -1)"
echo "--- kernel parity on $DEVICE:"
grep -E '^  |parity:' "$OUT/parity.log" || tail -5 "$OUT/parity.log"
if [ -f "$OUT/kernel_bench.log" ]; then
    echo "--- kernel benchmark (table; full log in $OUT/kernel_bench.log):"
    TABLE=$(awk '/^op +shape/{p=1} p' "$OUT/kernel_bench.log")
    if [ -n "$TABLE" ]; then echo "$TABLE" | head -60; else tail -40 "$OUT/kernel_bench.log"; fi
fi
echo "--- step benchmark ($OUT/step):"
if [ -f "$OUT/step/table.txt" ]; then cat "$OUT/step/table.txt"; else tail -30 "$OUT/step_bench.log"; fi
echo "--- exit codes: $(for k in kernel_tests cuda_parity kernel_bench step_bench; do printf '%s=%s ' "$k" "${RC[$k]:-?}"; done)"
for k in kernel_tests cuda_parity kernel_bench step_bench; do
    case "${RC[$k]:-1}" in 0|skipped) ;; *) exit 1 ;; esac
done
exit 0
