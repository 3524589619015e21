#!/usr/bin/env bash
# Everything a lent GPU is used for, in one command, step by step with a time limit each:
#
#   bash benchmarks/gpu_session.sh [STEP ...]      (default: setup kernels)
#
#   setup        versions, nvidia-smi, `pip install -e . --no-deps` (offline: the GPU image has torch/triton)
#   kernels      the kernel part, at most 6 minutes (its three steps below, in this order)
#     kernels-correctness   gpu_correctness.py: N = M = 65,536, D = 128, bf16, fp16 and fp32, against float64
#     kernels-times         kernel_times.py: cuBLAS bf16 and exp2 ceilings; per-kernel times at N = 32,768 and
#                           65,536 (SupCon "all" and each_positive, cross-level grouped query/key), this tree's
#                           kernels and the baseline's ($OLD_COMMIT) beside them
#     kernels-side-by-side  the benchmark sweep at N = 16,384 (dense eager, torch.compile, PML, chunked torch,
#                           triton), SupCon bf16 D = 128, forward + backward with peak memory
#   dispatch     after the kernels, before the long sweeps (at most 6.5 minutes): crossover.py --device cuda (dense
#                path against the kernels by logits per call, bf16 and fp32: what DENSE_MAX_LOGITS["cuda"] is set
#                from), the seed-size table (each loss module at its paper's size against its eager form), then
#                step_share.py (each example's training step at its preset's size with and without its
#                contrastive loss: the loss's share of the step, target at most 10%)
#   tests        pytest tests/kernels, kernels compiled for the GPU (the -m gpu set included)
#   tune         benchmarks/tune_blocks.py: tile shapes of the four kernels
#   smoke        a one-size slice of the benchmark sweep (checks the GPU harness quickly)
#   bench        the core of the GPU benchmark sweep (SupCon bf16, D = 128, every N; roofline; targets)
#   bench-more   more of it (fp32, cross-level, pseudo-label pixels at the largest sizes)
#   baseline     (no GPU) build/baseline-$OLD_COMMIT: the baseline's contrastkit with its kernels, from git;
#                run it before the GPU call and carry that folder, since the GPU machine has no git history
#   evidence-kvasir, evidence-acdc
#                the real-data training agenda of examples/study.py (plans gpu-kvasir, gpu-acdc): every
#                run of a plan at once on the GPU, each stopped at $BUDGET s (default 170), then one
#                table with paired intervals. The data come packed (examples/pack_data.py) under
#                $EVIDENCE_DATA (default runs/pack), one data set per device call: each copy nearly
#                fills what a call carries. Needs kornia and h5py on the GPU image (or their wheels in .whl/).
#
# DRY_RUN=1 runs the kernel part's Python entry points on the CPU through Triton's interpreter at tiny
# sizes (and only collects the side-by-side selection): it checks the wiring without a GPU.
# The whole log goes to $OUT/session.log and results beside it (default /tmp/contrastkit-gpu). Python
# wheels missing from the GPU image (pytorch-metric-learning for the benchmarks' peers) are installed
# from .whl/ when present.
set -u
OUT=${OUT:-/tmp/contrastkit-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${*:-setup kernels}
DRY_RUN=${DRY_RUN:-0}
OLD_COMMIT=${OLD_COMMIT:-18fed08}
OLD_TREE=${OLD_TREE:-build/baseline-$OLD_COMMIT}
WORKERS=${WORKERS:-12}
# The sweep in two parts, each saved on its own (a part cut short by its limit loses only itself);
# combine them with `python -m benchmarks.report --merge`.
BENCH_CORE=${BENCH_CORE:-"(supcon8 and D128 and bfloat16) or roofline or targets"}
BENCH_MORE=${BENCH_MORE:-"(supcon8 and D128 and float32 and (N16384 or N65536)) or (cross_level and N16384 and bfloat16) or (pl_pixel and N131072 and bfloat16)"}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-"supcon8 and N16384- and D128 and bfloat16 and bwd"}  # fwd+bwd, every provider
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1
fi

run_step() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/.$name.log" 2>&1
    local rc=$?
    { echo "=== $name: exit $rc after $((SECONDS - start)) s"; cat "$OUT/.$name.log"; } >>"$OUT/session.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    tail -n "${TAIL:-12}" "$OUT/.$name.log"
    rm -f "$OUT/.$name.log"
}

baseline_tree() {  # the baseline's package: $OLD_TREE/contrastkit with its kernels/ inside, as installed
    local tmp
    tmp=$(mktemp -d) || return 1
    git archive "$OLD_COMMIT" contrastkit kernels | tar -x -C "$tmp" || { rm -rf "$tmp"; return 1; }
    rm -rf "$OLD_TREE" && mkdir -p "$OLD_TREE" && mv "$tmp/contrastkit" "$OLD_TREE/" &&
        mv "$tmp/kernels" "$OLD_TREE/contrastkit/kernels"
    rm -rf "$tmp"
}

kernel_part() {
    local start=$SECONDS
    if [ "$DRY_RUN" = 1 ]; then
        run_step kernels-correctness 120 $PY benchmarks/gpu_correctness.py --cpu-dry-run --n 128 --d 24 --blocks 1 \
            --block-rows 32 --dtypes fp16 --out-dir "$OUT"
        TAIL=20 run_step kernels-times 120 $PY benchmarks/kernel_times.py --dry-run --sizes 96 \
            --cases supcon_all cross_level --out "$OUT"
        run_step kernels-side-by-side 60 $PY -m pytest benchmarks --ck-scale=full --collect-only -q \
            -p no:cacheprovider -k "$SIDE_BY_SIDE"
        return
    fi
    run_step kernels-correctness 100 $PY benchmarks/gpu_correctness.py --workers "$WORKERS" --out-dir "$OUT"
    if [ ! -d "$OLD_TREE/contrastkit/kernels" ] && ! baseline_tree 2>/dev/null; then
        echo "=== no baseline kernels: $OLD_TREE is missing and git cannot rebuild it here (no history);" \
            "the old column stays empty (run 'bash benchmarks/gpu_session.sh baseline' first and carry it)" |
            tee -a "$OUT/session.log"
    fi
    TAIL=40 run_step kernels-times 120 $PY benchmarks/kernel_times.py --rates --workers "$WORKERS" \
        --old-tree "$OLD_TREE" --old-timeout 80 --out "$OUT"
    # Whatever the steps before left of the part's 6 minutes, at most 130 s.
    local left=$((360 - (SECONDS - start)))
    [ "$left" -gt 130 ] && left=130
    if [ "$left" -lt 20 ]; then
        echo "=== kernels-side-by-side skipped: the kernel part's 6 minutes are spent" | tee -a "$OUT/session.log"
        return
    fi
    rm -f benchmarks/results/*-"$(date -u +%F)".json benchmarks/results/*-partial-*.jsonl
    TAIL=30 run_step kernels-side-by-side "$left" $PY -m pytest benchmarks --ck-scale=full --ck-save -q \
        -p no:cacheprovider -k "$SIDE_BY_SIDE"
    cp benchmarks/results/*-"$(date -u +%F)".json "$OUT/side-by-side.json" 2>/dev/null ||
        cp benchmarks/results/*-partial-*.jsonl "$OUT/side-by-side-partial.jsonl" 2>/dev/null
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
    kernels)
        kernel_part
        ;;
    baseline)
        baseline_tree && echo "baseline kernels of $OLD_COMMIT in $OLD_TREE"
        ;;
    dispatch)  # results land in $OUT: crossover-*.{md,json}, seed-sizes-*.{md,json}, step-share-*.{md,json}
        if [ "$DRY_RUN" = 1 ]; then
            TAIL=20 run_step crossover 120 $PY -m benchmarks.crossover --device cuda --dry-run --budget-s 50 \
                --out "$OUT"
            TAIL=20 run_step seed-sizes 120 $PY -m benchmarks.test_seed_sizes -k cross_level-8 --budget-s 0.1 \
                --out "$OUT"
            TAIL=10 run_step step-share 120 $PY -m benchmarks.step_share --device cpu --scale quick --budget-s 0.1 \
                --out "$OUT"
        else
            TAIL=40 run_step crossover 200 $PY -m benchmarks.crossover --device cuda --budget-s 160 --out "$OUT"
            TAIL=30 run_step seed-sizes 100 $PY -m benchmarks.test_seed_sizes --device cuda --out "$OUT"
            TAIL=10 run_step step-share 90 $PY -m benchmarks.step_share --device cuda --budget-s 25 --out "$OUT"
        fi
        ;;
    tests)
        run_step tests 300 $PY -m pytest tests/kernels -q --maxfail=10 -n 12 -p no:cacheprovider -rs
        ;;
    correctness)  # the kernel part's correctness step alone
        run_step correctness 180 $PY benchmarks/gpu_correctness.py --workers "$WORKERS" --out-dir "$OUT"
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
