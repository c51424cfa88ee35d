#!/usr/bin/env bash
# The skip-connection experiment at a larger scale on one CUDA GPU: the six variants x
# SEEDS, recorded in parallel (one process each), then the centre/edge table.
# Usage: DATA=PATH OUTDIR=DIR figures/gpu_science.sh   (needs gradflow importable)
set -uo pipefail
EPOCHS=${EPOCHS:-40}
STEPS=${STEPS:-25}
CROP=${CROP:-128}
BATCH=${BATCH:-8}
SEEDS=${SEEDS:-"0 1 2"}
LR=${LR:-1e-3}
LR_NOBN=${LR_NOBN:-1e-4}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-330}           # seconds any one run may take before it is stopped
DATA=${DATA:?set DATA to the ISBI 2012 folder}
OUTDIR=${OUTDIR:-runs-gpu}
mkdir -p "$OUTDIR"
MODELS=(fig3a-long-short-9 fig3b-long-9 fig3c-long-3 fig3d-long-7-nobn short-only-9 no-skips-9)
for seed in $SEEDS; do
    for model in "${MODELS[@]}"; do
        lr=$LR
        [[ "$model" == *nobn* ]] && lr=$LR_NOBN
        OMP_NUM_THREADS=1 timeout "$LIMIT" python -m gradflow.cli.main record --model "$model" \
            --data "$DATA" --epochs "$EPOCHS" --steps-per-epoch "$STEPS" --crop "$CROP" \
            --batch-size "$BATCH" --lr "$lr" --seed "$seed" --device "$DEVICE" --every 10 \
            --val-every 2 --out "$OUTDIR/$model-s$seed.h5" --force --log-every 100000 \
            > "$OUTDIR/$model-s$seed.log" 2>&1 &
    done
done
wait
python -m gradflow.cli.main plot centre-edge "$OUTDIR"/*-s*.h5 --out "$OUTDIR/centre_edge.md" --force
python -m gradflow.cli.main plot best-losses "$OUTDIR"/*-s*.h5 --out "$OUTDIR/best_losses.md" --force
cat "$OUTDIR/centre_edge.md" "$OUTDIR/best_losses.md"
