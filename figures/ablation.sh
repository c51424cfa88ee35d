#!/usr/bin/env bash
# Which ingredient makes the paper's update figure appear? Records the four Fig. 3 panels
# under four training conditions and several seeds on ISBI 2012, then writes the centre/edge
# ratios of the per-epoch updates (epoch/update_abs_mean) and of the gradient reaching each
# layer (grad_output/norm), mean and range over seeds, to figures/ablation/.
#
# Usage (from anywhere): figures/ablation.sh
#   Smoke test (1 seed, 2 epochs x 2 steps, 32 px crops, no validation): QUICK=1 figures/ablation.sh
#   It ends by drawing the update figure under SGD, one colour scale for the four panels
#   (seed 0), into figures/fig3_updates.png.
#   Override the scale like this:  EPOCHS=60 SEEDS="0 1 2" JOBS=4 figures/ablation.sh
#   Only the tables, from the runs already in runs/ablation/:  TABLES_ONLY=1 figures/ablation.sh
#
# Conditions (each panel's learning rate as in the gallery: panel (d), without batch norm,
# trains at a tenth of the others' rate):
#   rmsprop        RMSprop (lr 1e-3, rho 0.9, eps 1e-8) with the zoo's init (zero-initialised
#                  residual branches, classifier bias at the foreground prior): the gallery's
#   rmsprop-paper  the same RMSprop with the authors' init: Keras he_normal convolutions only
#   sgd-nesterov   SGD with Nesterov momentum 0.9 (the authors' alternative), lr LR_SGD
#   rmsprop-eps    RMSprop with eps 1e-4: the update follows the gradient's size where the
#                  gradient's RMS falls near eps
set -euo pipefail

QUICK=${QUICK:-0}
# --- scale: 3x the gallery's 12 x 16 steps by default ------------------------------------
if [[ "$QUICK" == 1 ]]; then
    EPOCHS=${EPOCHS:-2} STEPS=${STEPS:-2} CROP=${CROP:-32} SEEDS=${SEEDS:-0} VAL_EVERY=${VAL_EVERY:-0}
fi
EPOCHS=${EPOCHS:-36}          # epochs per run
STEPS=${STEPS:-16}            # optimizer steps per epoch
CROP=${CROP:-64}              # training crop side (pixels; the gallery's 96 px take 2x the time)
BATCH=${BATCH:-4}             # batch size
LR=${LR:-1e-3}                # RMSprop learning rate (the paper's)
LR_SGD=${LR_SGD:-1e-2}        # SGD learning rate (Keras' SGD default)
EPS_LARGE=${EPS_LARGE:-1e-4}  # eps of the rmsprop-eps condition
SEEDS=${SEEDS:-"0 1"}         # seeds per panel and condition
VAL_EVERY=${VAL_EVERY:-$EPOCHS}  # validate once, after the last epoch (0: never)
JOBS=${JOBS:-2}               # runs recorded in parallel (each on one CPU thread)
DATA=${DATA:-../shared/data/isbi2012}  # ISBI 2012 folder (relative to the repo root) or "synthetic"
TABLES_ONLY=${TABLES_ONLY:-0}

cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/ablation}
OUT=${OUT:-figures/ablation}
FIGURES=${FIGURES:-figures}
[[ "$QUICK" == 1 ]] && RUNS=runs/ablation-quick OUT=$RUNS FIGURES=$RUNS
mkdir -p "$RUNS" "$OUT"

PANELS=(fig3a-long-short-9 fig3b-long-9 fig3c-long-3 fig3d-long-7-nobn)
CONDITIONS=(rmsprop rmsprop-paper sgd-nesterov rmsprop-eps)

# --- record ------------------------------------------------------------------------------
if [[ "$TABLES_ONLY" != 1 ]]; then
    if [[ "$DATA" != synthetic && ! -d "$DATA" ]]; then
        echo "ablation: no ISBI 2012 data at $DATA (set DATA=PATH or DATA=synthetic)" >&2
        exit 2
    fi
    jobs=()
    for seed in $SEEDS; do
        for condition in "${CONDITIONS[@]}"; do
            for panel in "${PANELS[@]}"; do jobs+=("$panel $condition $seed"); done
        done
    done
    record_one() {  # panel condition seed
        local panel=$1 condition=$2 seed=$3 lr=$LR options=()
        case "$condition" in
            rmsprop) ;;
            rmsprop-paper) options=(--init paper) ;;
            sgd-nesterov) lr=$LR_SGD options=(--optimizer sgd --momentum 0.9 --nesterov) ;;
            rmsprop-eps) options=(--eps "$EPS_LARGE") ;;
        esac
        [[ "$panel" == *nobn* ]] && lr=$(python -c "print($lr / 10)")
        local out="$RUNS/$panel-$condition-s$seed"
        echo "== record $panel $condition (seed $seed, lr $lr)"
        OMP_NUM_THREADS=1 gradflow record --model "$panel" --data "$DATA" --epochs "$EPOCHS" \
            --steps-per-epoch "$STEPS" --crop "$CROP" --batch-size "$BATCH" --lr "$lr" \
            "${options[@]}" --seed "$seed" --val-every "$VAL_EVERY" --device cpu \
            --out "$out.h5" --force --log-every 1000 > "$out.log" 2>&1 \
            || { echo "record $panel $condition seed $seed failed:"; tail -5 "$out.log"; exit 1; }
    }
    export -f record_one
    export DATA EPOCHS STEPS CROP BATCH LR LR_SGD EPS_LARGE VAL_EVERY RUNS
    start=$SECONDS
    printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'record_one $0 $1 $2'
    echo "recorded ${#jobs[@]} runs of $EPOCHS x $STEPS steps in $((SECONDS - start)) s"
fi

# --- tables ------------------------------------------------------------------------------
RUNS="$RUNS" OUT="$OUT" PANELS="${PANELS[*]}" CONDITIONS="${CONDITIONS[*]}" python - <<'EOF'
"""Centre/edge ratios per panel and condition: mean, min and max over the seeds' runs."""
import csv
import os
from pathlib import Path

import numpy as np

from gradflow import open_run
from gradflow.analysis import centre_edge_ratio

runs, out = Path(os.environ["RUNS"]), Path(os.environ["OUT"])
QUANTITIES = {  # column prefix -> (probe, statistic)
    "update": ("epoch", "update_abs_mean"),
    "grad_output": ("grad_output", "norm"),
}
header = ["panel", "condition", "seeds"]
for prefix in QUANTITIES:
    header += [f"{prefix} mean", f"{prefix} min", f"{prefix} max"]
header += ["steps per run", "wall s/step"]
rows = []
for panel in os.environ["PANELS"].split():
    for condition in os.environ["CONDITIONS"].split():
        paths = sorted(runs.glob(f"{panel}-{condition}-s*.h5"))
        if not paths:
            continue
        ratios = {prefix: [] for prefix in QUANTITIES}
        steps, seconds = [], []
        for path in paths:
            with open_run(path) as run:
                for prefix, (probe, stat) in QUANTITIES.items():
                    ratios[prefix].append(centre_edge_ratio(run, stat, probe=probe))
                steps.append(run.n_steps)
                seconds.append(run.overhead.get("wall", np.nan) / max(run.n_steps, 1))
        row = [panel, condition, len(paths)]
        for values in ratios.values():
            row += [float(np.mean(values)), float(np.min(values)), float(np.max(values))]
        rows.append(row + [int(np.median(steps)), float(np.median(seconds))])

with open(out / "centre_edge.csv", "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerows([header, *rows])
cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
lines = [
    "Centre/edge ratio (central third of the conv layers over the outer thirds) of the",
    "per-epoch update `epoch/update_abs_mean` and of the gradient at each layer's output",
    "`grad_output/norm` (mean over recorded steps); below 1: the centre is starved.",
    "Mean, min and max over seeds. Written by figures/ablation.sh.",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *("| " + " | ".join(row) + " |" for row in cells),
]
(out / "centre_edge.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# --- the update figure under the condition that shows the paper's predictions -------------
# SGD: an update follows its gradient's size (RMSprop divides it out), so the four panels
# share one colour scale, as in the paper.
panel_runs=()
for panel in "${PANELS[@]}"; do panel_runs+=("$RUNS/$panel-sgd-nesterov-s${SEEDS%% *}.h5"); done
gradflow plot updates-heatmap "${panel_runs[@]}" --log --shared-scale --force \
    --title "SGD + Nesterov: mean |ΔW| per epoch and layer: (a) long+short, (b) long 9, (c) long 3, (d) long 7 no BN" \
    --out "$FIGURES/fig3_updates.png"
