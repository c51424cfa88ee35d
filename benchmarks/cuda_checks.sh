#!/usr/bin/env bash
# Everything gradflow checks on a CUDA machine, in one run (< 7 minutes):
# the CUDA variants of the recorder's reference tests, `gradflow record`/`plot` on CUDA,
# the GPU overhead/sync benchmark, and (SCIENCE=1) the skip-connection grid at GPU scale.
# Run from the repository root; for SCIENCE=1 copy the ISBI slices to .isbi (git-ignored):
#   mkdir -p .isbi && cp -r ../shared/data/isbi2012/train .isbi/
#   bash benchmarks/cuda_checks.sh      # results under $OUT (default: device-out/)
# SMOKE=0 skips the record/plot smoke run; BENCH_S sets the benchmark's budget (seconds).
# The benchmark times plain, param, all (fused Triton kernel for layer outputs) and
# all-torch (the same with torch reductions), interleaved.
set -u
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-device-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
git log -1 --format='commit %h %cd' 2>/dev/null || true
# The machine has torch and the other dependencies; install gradflow itself (and its CLI).
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2

echo "== CUDA tests"
timeout 120 python -m pytest -q -p no:cacheprovider tests/recorder/test_recorder.py tests/kernels -k cuda -rs \
    2>&1 | tee "$OUT/cuda_tests.txt" | tail -15

if [ "${SMOKE:-1}" = 1 ]; then
echo "== gradflow record / plot on CUDA"
rm -rf runs-cuda && mkdir -p runs-cuda
timeout 100 gradflow record --model fig3b-long-9 --device cuda --epochs 2 --steps-per-epoch 10 \
    --out runs-cuda/smoke.h5 2>&1 | tail -5
timeout 45 gradflow plot updates-heatmap runs-cuda/smoke.h5 --out "$OUT/smoke_updates.png" \
    2>&1 | tail -2
timeout 30 gradflow info runs-cuda/smoke.h5 2>&1 | tail -12
fi

echo "== GPU benchmark"
# GPU_ARGS: more gpu.py options, e.g. "--profile" (where a step's time goes).
timeout $((${BENCH_S:-150} + 60)) python benchmarks/gpu.py --budget-s "${BENCH_S:-150}" \
    --json "$OUT/gpu_bench.json" ${GPU_ARGS:-} \
    2>&1 | tee "$OUT/gpu_bench.txt" | tail -45

if [ "${SCIENCE:-0}" = 1 ]; then
    EPOCHS=${EPOCHS:-30} STEPS=${STEPS:-25} CROP=${CROP:-128} BATCH=${BATCH:-8} \
        LIMIT=${LIMIT:-280} DATA=.isbi OUTDIR=runs-gpu bash figures/gpu_science.sh 2>&1 |
        tee "$OUT/science.txt"
    cp runs-gpu/centre_edge.md "$OUT/centre_edge_gpu.md" 2>/dev/null
    cp runs-gpu/best_losses.md "$OUT/best_losses_gpu.md" 2>/dev/null
fi
ls -la "$OUT"
