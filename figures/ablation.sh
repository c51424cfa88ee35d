#!/usr/bin/env bash
# Do the paper's four predictions replicate? Records the four Fig. 3 panels under each training
# condition, SEEDS seeds each, at every scale in SCALES (crop side : epochs x steps per epoch),
# on ISBI 2012, then writes per scale and condition the centre/edge ratios of the per-epoch
# updates (epoch/update_abs_mean) and of the gradient reaching each layer (grad_output/norm),
# and a verdict per prediction from a bootstrap 95 % interval over seeds (gradflow.em.verdicts),
# to figures/ablation/.
#
# Usage (from anywhere): figures/ablation.sh
#   Smoke test (2 seeds, 2 epochs x 2 steps, 32 px crops): QUICK=1 figures/ablation.sh
#   Override the scale like this:  SCALES="64:36x16" SEEDS="0 1 2" JOBS=4 figures/ablation.sh
#   Only the tables and figures, from the runs already in runs/ablation/: TABLES_ONLY=1 ...
#   A run already recorded (its .done marker exists) is not recorded again.
#
# Conditions (each panel's learning rate as in the gallery: panel (d), without batch norm,
# trains at a tenth of the others' rate); the default is rmsprop and sgd-nesterov:
#   rmsprop        RMSprop (lr 1e-3, rho 0.9, eps 1e-8) with the zoo's init (zero-initialised
#                  residual branches, classifier bias at the foreground prior): the gallery's
#   rmsprop-paper  the same RMSprop with the authors' init: Keras he_normal convolutions only
#   sgd-nesterov   SGD with Nesterov momentum 0.9 (the authors' alternative), lr LR_SGD
#   rmsprop-eps    RMSprop with eps 1e-4: the update follows the gradient's size where the
#                  gradient's RMS falls near eps
set -euo pipefail

QUICK=${QUICK:-0}
if [[ "$QUICK" == 1 ]]; then
    SCALES=${SCALES:-"32:2x2"} SEEDS=${SEEDS:-"0 1"}
fi
# crop:EPOCHSxSTEPS, one scale each: 192 steps at 64 and 96 px, 384 steps at 64 px
SCALES=${SCALES:-"64:16x12 96:16x12 64:24x16"}
CONDITIONS=${CONDITIONS:-"rmsprop sgd-nesterov"}
SEEDS=${SEEDS:-"0 1 2 3 4"}   # seeds per panel, condition and scale
BATCH=${BATCH:-4}             # batch size
LR=${LR:-1e-3}                # RMSprop learning rate (the paper's)
LR_SGD=${LR_SGD:-1e-2}        # SGD learning rate (Keras' SGD default)
EPS_LARGE=${EPS_LARGE:-1e-4}  # eps of the rmsprop-eps condition
VAL_EVERY=${VAL_EVERY:-0}     # validate every K epochs (0: never; the tables read training statistics)
JOBS=${JOBS:-2}               # runs recorded in parallel (each on one CPU thread)
DATA=${DATA:-../shared/data/isbi2012}  # ISBI 2012 folder (relative to the repo root) or "synthetic"
PROBES=${PROBES:-param,grad_output}   # what the tables read (the activation probe is not needed)
GRADFLOW=${GRADFLOW:-gradflow}
TABLES_ONLY=${TABLES_ONLY:-0}

cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/ablation}
OUT=${OUT:-figures/ablation}
FIGURES=${FIGURES:-figures}
[[ "$QUICK" == 1 ]] && RUNS=runs/ablation-quick OUT=runs/ablation-quick FIGURES=runs/ablation-quick
mkdir -p "$RUNS" "$OUT"

PANELS=(fig3a-long-short-9 fig3b-long-9 fig3c-long-3 fig3d-long-7-nobn)

# --- record: scale by scale, so that a scale's tables can be read before the next ends ------
if [[ "$TABLES_ONLY" != 1 ]]; then
    if [[ "$DATA" != synthetic && ! -d "$DATA" ]]; then
        echo "ablation: no ISBI 2012 data at $DATA (set DATA=PATH or DATA=synthetic)" >&2
        exit 2
    fi
    record_one() {  # scale panel condition seed
        local scale=$1 panel=$2 condition=$3 seed=$4 lr=$LR options=()
        local crop=${scale%%:*} schedule=${scale#*:}
        local epochs=${schedule%%x*} steps=${schedule#*x}
        case "$condition" in
            rmsprop) ;;
            rmsprop-paper) options=(--init paper) ;;
            sgd-nesterov) lr=$LR_SGD options=(--optimizer sgd --momentum 0.9 --nesterov) ;;
            rmsprop-eps) options=(--eps "$EPS_LARGE") ;;
            *) echo "ablation: unknown condition $condition" >&2; exit 2 ;;
        esac
        [[ "$panel" == *nobn* ]] && lr=$(python -c "print($lr / 10)")
        local dir="$RUNS/${crop}px-$((epochs * steps))steps"
        local out="$dir/$panel-$condition-s$seed"
        mkdir -p "$dir"
        [[ -e "$out.done" ]] && return 0
        echo "== record $panel $condition (seed $seed, lr $lr, $crop px, $epochs x $steps steps)"
        OMP_NUM_THREADS=1 $GRADFLOW record --model "$panel" --data "$DATA" --epochs "$epochs" \
            --steps-per-epoch "$steps" --crop "$crop" --batch-size "$BATCH" --lr "$lr" \
            "${options[@]}" --seed "$seed" --val-every "$VAL_EVERY" --device cpu \
            --probes "$PROBES" --out "$out.h5" --force --log-every 1000 > "$out.log" 2>&1 \
            || { echo "record $panel $condition seed $seed failed:"; tail -5 "$out.log"; exit 1; }
        touch "$out.done"
    }
    export -f record_one
    export DATA LR LR_SGD EPS_LARGE VAL_EVERY RUNS BATCH PROBES GRADFLOW
    for scale in $SCALES; do
        jobs=()
        for seed in $SEEDS; do
            for condition in $CONDITIONS; do
                for panel in "${PANELS[@]}"; do jobs+=("$scale $panel $condition $seed"); done
            done
        done
        start=$SECONDS
        printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'record_one $0 $1 $2 $3'
        echo "scale $scale: ${#jobs[@]} runs in $((SECONDS - start)) s"
    done
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
