#!/usr/bin/env bash
# Do the paper's four predictions replicate? Records the four Fig. 3 panels under each training
# condition, SEEDS seeds each, at every scale in SCALES (crop side : epochs x steps per epoch),
# on ISBI 2012, then writes per scale and condition the centre/edge ratios of the per-epoch
# updates (epoch/update_abs_mean) and of the gradient reaching each layer (grad_output/norm),
# and a verdict per prediction from a bootstrap 95 % interval over seeds (gradflow.em.verdicts),
# to figures/ablation/. Then draws the depth profiles of every condition at PROFILE_SCALE
# (figures/depth_profile_<condition>.png), the update heat maps under SGD at FIGURE_SCALE
# (figures/fig3_updates.png) and, from panels (a) and (b) recorded again at SKIP_SCALE under
# sgd-nesterov with the skip probe (runs/ablation/skip/), the share of the gradient that takes
# each skip connection (figures/shortcut_share.png). A figure whose runs are missing is skipped.
#
# Usage (from anywhere): figures/ablation.sh
#   Smoke test (2 seeds, 2 epochs x 2 steps, 32 px crops): QUICK=1 figures/ablation.sh
#   Override the scale like this:  SCALES="64:36x16" SEEDS="0 1 2" JOBS=4 figures/ablation.sh
#   Only the tables and figures, from the runs already in runs/ablation/: TABLES_ONLY=1 ...
#   A run already recorded (its .done marker exists) is not recorded again.
#   A replication with seeds the ablation did not use (its tables then compare it with the
#   ablation's predicted ranges, figures/ablation/replication.md):
#     SEEDS="5 6 7 8 9" SCALES=64:16x12 RUNS=runs/replication SKIP_SCALE= \
#       OUT=runs/replication/tables FIGURES=runs/replication figures/ablation.sh
#     TABLES_ONLY=1 figures/ablation.sh
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
    PROFILE_SCALE=${PROFILE_SCALE:-"32:2x2"} FIGURE_SCALE=${FIGURE_SCALE:-"32:2x2"}
    SKIP_SCALE=${SKIP_SCALE-"32:2x2"}
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
PROFILE_SCALE=${PROFILE_SCALE:-"64:16x12"}  # the depth profiles' scale (all panels, all seeds)
FIGURE_SCALE=${FIGURE_SCALE:-"64:24x16"}    # the update heat maps' scale (first seed)
SKIP_SCALE=${SKIP_SCALE-"64:16x12"}         # panels (a), (b) with the skip probe ("": none)

cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/ablation}
REPLICATION=${REPLICATION:-runs/replication}  # runs with other seeds, compared if present
OUT=${OUT:-figures/ablation}
FIGURES=${FIGURES:-figures}
[[ "$QUICK" == 1 ]] && RUNS=runs/ablation-quick OUT=runs/ablation-quick FIGURES=runs/ablation-quick REPLICATION=
mkdir -p "$RUNS" "$OUT"

PANELS=(fig3a-long-short-9 fig3b-long-9 fig3c-long-3 fig3d-long-7-nobn)
scale_dir() {  # runs_root crop:EPOCHSxSTEPS -> the scale's folder, e.g. runs/ablation/64px-192steps
    local crop=${2%%:*} schedule=${2#*:}
    echo "$1/${crop}px-$((${schedule%%x*} * ${schedule#*x}))steps"
}
collect() {  # folder condition "seeds" panel...: the run files (seed by seed), if all are done
    local dir=$1 condition=$2 seeds=$3 seed panel
    shift 3
    for seed in $seeds; do
        for panel in "$@"; do [[ -e "$dir/$panel-$condition-s$seed.done" ]] || return 1; done
    done
    for seed in $seeds; do
        for panel in "$@"; do echo "$dir/$panel-$condition-s$seed.h5"; done
    done
}

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
        local dir
        dir=$(scale_dir "$RUNS" "$scale")
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
    export -f record_one scale_dir
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
    # The mechanism: panels (a) and (b) again, with the skip probe (its own folder, so the
    # tables above never mix runs recorded with different probes).
    if [[ -n "$SKIP_SCALE" ]]; then
        for seed in $SEEDS; do
            for panel in "${PANELS[@]:0:2}"; do echo "$SKIP_SCALE $panel sgd-nesterov $seed"; done
        done | RUNS="$RUNS/skip" PROBES="$PROBES,skip" xargs -P "$JOBS" -L 1 \
            bash -c 'record_one $0 $1 $2 $3'
    fi
fi

# --- tables: verdicts with bootstrap intervals, per-run centre/edge ratios, replication ---
if compgen -G "$RUNS/*px-*steps/*.done" > /dev/null; then
    replication=()
    if [[ -n "$REPLICATION" && "$REPLICATION" != "$RUNS" ]] && compgen -G "$REPLICATION/*px-*steps/*.done" > /dev/null; then
        replication=("$REPLICATION")
    fi
    python -m gradflow.em.verdicts "$RUNS" "$OUT" "${replication[@]}"
else
    echo "ablation: no finished runs in $RUNS/<scale>/: no tables"
fi

# --- figures: each from finished runs only, skipped where they are missing ---------------
label() {  # a condition's name in file names
    case "$1" in
        sgd-nesterov) echo "sgd" ;;
        *) echo "$1" ;;
    esac
}
# Depth profiles: every panel, mean and min-max band over the seeds (mean over epochs/steps).
dir=$(scale_dir "$RUNS" "$PROFILE_SCALE")
for condition in $CONDITIONS; do
    if ! files=$(collect "$dir" "$condition" "$SEEDS" "${PANELS[@]}"); then
        echo "ablation: $dir lacks finished $condition runs: no depth profile"
        continue
    fi
    mapfile -t runs <<< "$files"
    $GRADFLOW plot depth-profile "${runs[@]}" --log --force \
        --title "$condition, ${dir##*/}: (a) long+short 9, (b) long 9, (c) long 3, (d) long 7 no BN" \
        --out "$FIGURES/depth_profile_$(label "$condition").png"
done

# The update figure under SGD: an update follows its gradient's size (RMSprop divides it out),
# so the four panels share one colour scale, as in the paper.
dir=$(scale_dir "$RUNS" "$FIGURE_SCALE")
if files=$(collect "$dir" sgd-nesterov "${SEEDS%% *}" "${PANELS[@]}"); then
    mapfile -t runs <<< "$files"
    $GRADFLOW plot updates-heatmap "${runs[@]}" --log --shared-scale --force \
        --title "SGD + Nesterov: mean |ΔW| per epoch and layer: (a) long+short, (b) long 9, (c) long 3, (d) long 7 no BN" \
        --out "$FIGURES/fig3_updates.png"
else
    echo "ablation: $dir lacks finished sgd-nesterov runs: no update heat maps"
fi

# Which path the gradient takes: panels (a) and (b) with the skip probe, every seed.
if [[ -n "$SKIP_SCALE" ]]; then
    dir=$(scale_dir "$RUNS/skip" "$SKIP_SCALE")
    if files=$(collect "$dir" sgd-nesterov "$SEEDS" "${PANELS[@]:0:2}"); then
        mapfile -t runs <<< "$files"
        $GRADFLOW plot shortcut-share "${runs[@]}" --force \
            --title "SGD + Nesterov, ${dir##*/}: share of the gradient through each skip" \
            --out "$FIGURES/shortcut_share.png"
    else
        echo "ablation: $dir lacks finished runs: no shortcut-share figure"
    fi
fi
