#!/usr/bin/env bash
# Everything a lent GPU is used for, in one command, step by step with a time limit each:
#
#   bash benchmarks/gpu_session.sh [STEP ...]      (default: setup tests correctness bench bench-more tune)
#
#   setup        versions, nvidia-smi, `pip install -e . --no-deps` (offline: the GPU image has torch/triton)
#   tests        pytest tests/kernels, kernels compiled for the GPU (the -m gpu set included)
#   correctness  benchmarks/gpu_correctness.py at N = M = 65,536, D = 128, bf16 and fp32
#   tune         benchmarks/tune_blocks.py: tile shapes of the three kernels
#   smoke        a one-size slice of the benchmark sweep (checks the GPU harness quickly)
#   bench        the core of the GPU benchmark sweep (SupCon bf16, D = 128, every N; roofline; targets)
#   bench-more   more of it (fp32, cross-level, pseudo-label pixels at the largest sizes)
#   evidence-kvasir, evidence-acdc
#                the real-data training agenda of examples/study.py (plans gpu-kvasir, gpu-acdc): every
#                run of a plan at once on the GPU, each stopped at $BUDGET s (default 170), then one
#                table with paired intervals. The data come packed (examples/pack_data.py) under
#                $EVIDENCE_DATA (default runs/pack), one data set per device call: each copy nearly
#                fills what a call carries. Needs kornia and h5py on the GPU image (or their wheels in .whl/).
#
# The whole log goes to $OUT/session.log and results beside it (default /tmp/contrastkit-gpu). Python wheels missing from the GPU
# image (pytorch-metric-learning for the benchmarks' peers) are installed from .whl/ when present.
set -u
OUT=${OUT:-/tmp/contrastkit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${*:-setup tests correctness bench bench-more tune}
# The sweep in two parts, each saved on its own (a part cut short by its limit loses only itself);
# combine them with `python -m benchmarks.report --merge`.
BENCH_CORE=${BENCH_CORE:-"(supcon8 and D128 and bfloat16) or roofline or targets"}
BENCH_MORE=${BENCH_MORE:-"(supcon8 and D128 and float32 and (N16384 or N65536)) or (cross_level and N16384 and bfloat16) or (pl_pixel and N131072 and bfloat16)"}

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
        run_step tests 300 $PY -m pytest tests/kernels -q --maxfail=10 -n 12 -p no:cacheprovider -rs
        ;;
    correctness)
        run_step correctness 180 $PY benchmarks/gpu_correctness.py --out-dir "$OUT"
        ;;
    tune)
        TAIL=30 run_step tune 300 $PY benchmarks/tune_blocks.py --out-dir "$OUT" --budget-s 200 ${TUNE_ARGS:-}
        ;;
    smoke)
        run_step smoke 150 $PY -m pytest benchmarks --ck-scale=full -q -p no:cacheprovider \
            -k "(supcon8 and N1024- and D128 and bfloat16) or roofline"
        ;;
    bench | bench-more)
        if [ "$step" = bench ]; then selection=$BENCH_CORE limit=240; else selection=$BENCH_MORE limit=150; fi
        rm -f benchmarks/results/*-"$(date -u +%F)".json benchmarks/results/*-partial-*.jsonl
        TAIL=45 run_step "$step" "$limit" $PY -m pytest benchmarks --ck-scale=full --ck-save -q \
            -p no:cacheprovider -k "$selection"
        # The results file when the part completed, else the rows it measured before its limit.
        cp benchmarks/results/*-"$(date -u +%F)".json "$OUT/$step.json" 2>/dev/null ||
            cp benchmarks/results/*-partial-*.jsonl "$OUT/$step-partial.jsonl" 2>/dev/null
        ;;
    evidence-kvasir | evidence-acdc)
        budget=${BUDGET:-170}
        TAIL=30 run_step "$step" $((budget * 3 / 2 + 180)) $PY examples/study.py run "gpu-${step#evidence-}" \
            --data-root "${EVIDENCE_DATA:-runs/pack}" --budget-s "$budget" --out "$OUT/$step"
        cat "$OUT/$step"/summary-*.md 2>/dev/null
        ;;
    *)
        echo "unknown step $step" >&2
        exit 2
        ;;
    esac
done
