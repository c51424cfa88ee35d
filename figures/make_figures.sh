#!/usr/bin/env bash
# Regenerates every gallery figure from scratch: records the runs, then draws the figures.
# Usage (from anywhere): figures/make_figures.sh
#   Override the scale like this:  EPOCHS=50 STEPS=40 CROP=128 SEEDS="0 1" figures/make_figures.sh
#   Re-draw from existing runs without training:  PLOT_ONLY=1 figures/make_figures.sh
set -euo pipefail

# --- scale: CPU-minutes defaults; raise them for figures closer to the paper -------------
EPOCHS=${EPOCHS:-12}          # epochs per run
STEPS=${STEPS:-16}            # optimizer steps per epoch
CROP=${CROP:-96}              # training crop side (pixels)
BATCH=${BATCH:-4}             # batch size
LR=${LR:-1e-3}                # RMSprop learning rate (the paper's)
LR_NOBN=${LR_NOBN:-1e-4}      # panel (d) has no batch norm and trains with a lower rate
SEEDS=${SEEDS:-"0 1 2"}       # one run per model and seed; heat maps use the first seed
JOBS=${JOBS:-2}               # runs recorded in parallel (each on one CPU thread)
DATA=${DATA:-../shared/data/isbi2012}  # ISBI 2012 folder (relative to the repo root) or "synthetic"
PLOT_ONLY=${PLOT_ONLY:-0}     # 1: skip recording, draw from the runs already in runs/

cd "$(dirname "$0")/.."
RUNS=runs
OUT=figures
mkdir -p "$RUNS"

MODELS=(fig3a-long-short-9 fig3b-long-9 fig3c-long-3 fig3d-long-7-nobn short-only-9 no-skips-9)
SEED0=${SEEDS%% *}
run() { echo "$RUNS/$1-s$2.h5"; }

# --- record ------------------------------------------------------------------------------
if [[ "$PLOT_ONLY" != 1 ]]; then
    if [[ "$DATA" != synthetic && ! -d "$DATA" ]]; then
        echo "make_figures: no ISBI 2012 data at $DATA (set DATA=PATH or DATA=synthetic)" >&2
        exit 2
    fi
    jobs=()
    for seed in $SEEDS; do
        for model in "${MODELS[@]}"; do
            lr=$LR
            [[ "$model" == *nobn* ]] && lr=$LR_NOBN
            jobs+=("$model $seed $lr")
        done
    done
    record_one() {  # model seed lr
        echo "== record $1 (seed $2)"
        OMP_NUM_THREADS=1 gradflow record --model "$1" --data "$DATA" --epochs "$EPOCHS" \
            --steps-per-epoch "$STEPS" --crop "$CROP" --batch-size "$BATCH" --lr "$3" \
            --seed "$2" --device cpu --out "$RUNS/$1-s$2.h5" --force --log-every 1000 \
            > "$RUNS/$1-s$2.log" 2>&1 || { echo "record $1 seed $2 failed:"; tail -5 "$RUNS/$1-s$2.log"; exit 1; }
    }
    export -f record_one
    export DATA EPOCHS STEPS CROP BATCH RUNS
    printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'record_one $0 $1 $2'
fi

# --- plot --------------------------------------------------------------------------------
A=$(run fig3a-long-short-9 "$SEED0")
B=$(run fig3b-long-9 "$SEED0")
C=$(run fig3c-long-3 "$SEED0")
D=$(run fig3d-long-7-nobn "$SEED0")
curves=()  # every seed: one mean curve per model with a min-max band over the seeds
for model in fig3a-long-short-9 short-only-9 fig3b-long-9; do
    for seed in $SEEDS; do curves+=("$(run "$model" "$seed")"); done
done

# Under RMSprop (the gallery's training) updates span decades across layers, and (d)'s
# lower learning rate shifts its whole range: a log scale per panel keeps every panel's
# depth pattern readable. figures/ablation.sh draws fig3_updates.png, under SGD.
gradflow plot updates-heatmap "$A" "$B" "$C" "$D" --log --per-panel-scale --force \
    --title "RMSprop: mean |ΔW| per epoch and layer: (a) long+short, (b) long 9, (c) long 3, (d) long 7 no BN" \
    --out "$OUT/fig3_updates_rmsprop.png"
gradflow plot learning-curves "${curves[@]}" --force \
    --title "Learning curves: long+short, only short, only long skips" --out "$OUT/learning_curves.png"
gradflow plot best-losses "$RUNS"/*-s*.h5 --force --out "$OUT/best_losses.md"
gradflow plot diff-heatmap "$A" "$B" --log --force \
    --title "Epoch updates, log10 (a)/(b)" \
    --out "$OUT/diff_a_b.png"
gradflow plot gradient-heatmap "$A" "$B" --stat grad_output/norm --steps : --log --force \
    --title "Gradient norm at each layer's output, per step" --out "$OUT/grad_output_a_b.png"

gradflow plot centre-edge "$RUNS"/*-s*.h5 --force --out "$OUT/centre_edge.md"

# A model from outside the zoo: a 12-block ViT in plain torch, recorded with gradflow.Recorder.
python figures/transformer_example.py --run "$RUNS/vit-12.h5" --out "$OUT/transformer_updates.png"
python figures/monai_example.py --data "$DATA" --run "$RUNS/monai-unet.h5" --out "$OUT/monai_updates.png"

big=$(find "$OUT" -name '*.png' -size +500k)
if [[ -n "$big" ]]; then
    echo "make_figures: over 500 KB (lower DPI in gradflow/plots/style.py): $big" >&2
    exit 1
fi
ls -l "$OUT"
