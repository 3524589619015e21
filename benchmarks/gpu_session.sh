#!/usr/bin/env bash
# Everything a lent GPU is used for, in one command, step by step with a time limit each:
#
#   bash benchmarks/gpu_session.sh [STEP ...]      (default: setup tests correctness tune bench)
#
#   setup        versions, nvidia-smi, `pip install -e . --no-deps` (offline: the GPU image has torch/triton)
#   tests        pytest tests/kernels, kernels compiled for the GPU (the -m gpu set included)
#   correctness  benchmarks/gpu_correctness.py at N = M = 65,536, D = 128, bf16 and fp32
#   tune         benchmarks/tune_blocks.py: tile shapes of the three kernels
#   smoke        a one-size slice of the benchmark sweep (checks the GPU harness quickly)
#   bench        the GPU benchmark sweep (a subset of --ck-scale=full sized to fit one call), saved
#
# The whole log goes to $OUT/session.log and results beside it (default /tmp/contrastkit-gpu). Python wheels missing from the GPU
# image (pytorch-metric-learning for the benchmarks' peers) are installed from .whl/ when present.
set -u
OUT=${OUT:-/tmp/contrastkit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${*:-setup tests correctness tune bench}
BENCH_K=${BENCH_K:-"(supcon8 and D128) or (cross_level and N16384) or (cross_level and N65536) or (pl_pixel and N32768) or (pl_pixel and N131072) or roofline or targets"}

run_step() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"/tmp/$name.log" 2>&1
    local rc=$?
    { echo "=== $name: exit $rc after $((SECONDS - start)) s"; cat "/tmp/$name.log"; } >>"$OUT/session.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "/tmp/$name.log"
}

for step in $STEPS; do
    case $step in
    setup)
        run_step setup 120 bash -c "
            nvidia-smi; uname -a; date -u
            if ls .whl/*.whl >/dev/null 2>&1; then
                $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
            fi
            $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
            $PY -c 'import torch, triton, contrastkit.kernels as k; print(torch.__version__, triton.__version__,
                torch.cuda.get_device_name(), k.unavailable_reason())'"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        ;;
    tests)
        run_step tests 300 $PY -m pytest tests/kernels -q --maxfail=10 -n 8 -p no:cacheprovider -rs
        ;;
    correctness)
        run_step correctness 180 $PY benchmarks/gpu_correctness.py --out-dir "$OUT"
        ;;
    tune)
        TAIL=30 run_step tune 300 $PY benchmarks/tune_blocks.py --out-dir "$OUT" --budget-s 200
        ;;
    smoke)
        run_step smoke 150 $PY -m pytest benchmarks --ck-scale=full -q -p no:cacheprovider \
            -k "(supcon8 and N1024- and D128 and bfloat16) or roofline"
        ;;
    bench)
        TAIL=60 run_step bench 420 $PY -m pytest benchmarks --ck-scale=full --ck-save -q -p no:cacheprovider \
            -k "$BENCH_K"
        cp benchmarks/results/*-"$(date -u +%F)".* "$OUT"/ 2>/dev/null
        ;;
    *)
        echo "unknown step $step" >&2
        exit 2
        ;;
    esac
done
