#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device (about 6 minutes on an H200):
#   1. the CUDA tests (tests/test_gpu.py);
#   2. benchmarks/inference.py on the GPU, eager (default precision: bf16 autocast);
#   3. benchmarks/training.py on the GPU (data path against batches in memory);
#   4. benchmarks/inference.py with torch.compile;
#   5. the fast test suite with the GPU visible (device: auto picks it);
#   6. configs/brats.yaml (1 mm, ResNet-50, batch 32) on built-in cases: the data path against
#      batches in memory (benchmarks/training.py), then `train` itself for two short epochs;
#   7. `make train`'s recipe (configs/default.yaml) trained on the GPU, whose model then times
#      `infer` over 4 and 32 cases with --workers 0, 4 and 8 (benchmarks/scaling.py).
# Each step has its own time limit, so one that hangs does not take the others with it;
# each writes <step>.log (and the benchmarks their JSON) to $OUT, and its last lines to stdout.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh     # results and logs in $OUT (default benchmarks/results)
#     ONLY="tests_gpu training_cuda" bash benchmarks/gpu_check.sh   # some of the steps
#
# Steps 6 and 7 write their runs under $WORK (default a temporary folder).
set -u
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log it, keep going
    local limit=$1 name=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "== $name ($(date +%T))"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    grep -aE "^(FAILED|ERROR) |(FAILED|ERROR) +\[" "$OUT/$name.log" | head -n 40
    echo "== $name: exit $rc after $((SECONDS - start)) s"
}

{ nvidia-smi -L; $PY -c "import torch, monai, mlflow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__, 'mlflow', mlflow.__version__)"; } 2>&1
step 180 tests_gpu $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs
step 150 inference_cuda $PY benchmarks/inference.py --device cuda --repeats 5 --out "$OUT/inference_cuda.json"
step 150 training_cuda $PY benchmarks/training.py --steps 200 --out "$OUT/training_cuda.json" train.device=cuda
step 180 inference_cuda_compile $PY benchmarks/inference.py --device cuda --compile --no-seed --repeats 5 --out "$OUT/inference_cuda_compile.json"
# -v prints each result as it comes, so a suite stopped at its limit still names its failures
step "${SUITE_LIMIT:-240}" suite_gpu $PY -m pytest -v --tb=short -p no:cacheprovider -n "${SUITE_WORKERS:-8}" -m "not slow" --deselect tests/test_gpu.py

# 6. the recipe for real data: cases at 1 mm, ResNet-50 width 64, batch 32, 8 loader workers
step 240 training_brats_cuda $PY benchmarks/training.py --config configs/brats.yaml --cases 16 --steps 60 --rounds 2 \
    --workers "$(nproc)" --out "$OUT/training_brats_cuda.json" train.device=cuda data.cache_dir="$WORK/cache"
step 240 train_brats_cuda $PY pipelines/run.py train --config configs/brats.yaml data.demo_cases=16 data.cache_dir="$WORK/cache" \
    train.epochs=2 train.slices_per_epoch=3200 train.val_every=1 train.output_dir="$WORK/brats" tracking.uri="sqlite:///$WORK/mlflow.db"
# 7. make train's recipe on the GPU; its model times infer over many cases, with and without workers
step 300 train_default_cuda $PY pipelines/run.py train data.cache_dir="$WORK/cache" train.output_dir="$WORK/default" \
    tracking.uri="sqlite:///$WORK/mlflow.db"
CKPT=$(ls "$WORK"/default/*/checkpoints/best.pt 2>/dev/null | head -n 1)
step 240 infer_scaling_cuda $PY benchmarks/scaling.py --checkpoint "${CKPT:-missing-best.pt}" --cases 4 32 --infer-workers 0 4 8 --procs \
    --out "$OUT/scaling_cuda.json"
