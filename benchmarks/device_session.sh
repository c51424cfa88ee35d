#!/usr/bin/env bash
# Everything gradflow checks on a lent CUDA machine, in one unattended call (< 9 minutes):
# the GPU overhead/sync benchmark, then the skip-connection grid at GPU scale.
# Run from the repository root with the ISBI slices copied to .isbi (git-ignored):
#   mkdir -p .isbi && cp -r ../shared/data/isbi2012/train .isbi/
#   bash benchmarks/device_session.sh      # results under $OUT (default: device-out/)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-device-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
git log -1 --format='commit %h %cd' 2>/dev/null || true

timeout 200 python benchmarks/gpu.py --budget-s ${BENCH_S:-150} --json "$OUT/gpu_bench.json" \
    2>&1 | tee "$OUT/gpu_bench.txt" | tail -40

EPOCHS=${EPOCHS:-30} STEPS=${STEPS:-25} CROP=${CROP:-128} BATCH=${BATCH:-8} LIMIT=${LIMIT:-280} \
    DATA=.isbi OUTDIR=runs-gpu bash figures/gpu_science.sh 2>&1 | tee "$OUT/science.txt"
cp runs-gpu/centre_edge.md "$OUT/centre_edge_gpu.md" 2>/dev/null
cp runs-gpu/best_losses.md "$OUT/best_losses_gpu.md" 2>/dev/null
tar czf "$OUT/runs_gpu_s0.tgz" runs-gpu/*-s0.h5 runs-gpu/*.log 2>/dev/null
ls -la "$OUT"
