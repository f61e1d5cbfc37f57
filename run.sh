#!/usr/bin/env bash
# The whole pipeline, every stage in order; stops at the first failing stage.
#   bash run.sh                                # makes the demo set (demo_data/), tiny settings, CPU
#   bash run.sh DATA_DIR                       # real data (the Kaggle folder), production settings
#   bash run.sh --predict-only MODELS [DATA_DIR]  # a submission from trained models, no training
# Environment (all optional):
#   WORK         the work folder (default work)
#   WEIGHTS_DIR  a folder with ARCH.safetensors for each image model (real data; without it the
#                pretrained weights must be in timm's local cache)
#   ARCHS        the image models (default eva02_base convnext; the demo: eva02_tiny convnext_atto)
#   TRAIN        what to train, "ARCH:FOLDS ..." (FOLDS: all, or a comma list; default every fold
#                of every model in ARCHS; "" trains nothing: fold models already in WORK/models)
#   FINISH       0: stop after training (a training run in parts); default 1: extraction, GBDTs,
#                ensemble, report
#   RESUME       1: continue the folds that an earlier run left unfinished (train_backbone.py --resume)
#   DEADLINE     start no fold or epoch that would end after this time (seconds since 1970, `date +%s`)
#   NGPU         processes per image stage (default: the GPUs visible); above 1 they run under torchrun
#   SUBMISSION   also copy the submission here as soon as it is written, before the report
#   DEMO_ARGS, FEATURES_ARGS, TRAIN_ARGS, EXTRACT_ARGS, GBDT_ARGS: extra options for demo.py and those stages
#   PYTHON       the interpreter (default python)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# paths are taken from where run.sh is called, then the scripts run from their own folder
WORK=$(realpath -m "${WORK:-work}")
[ -n "${WEIGHTS_DIR:-}" ] && WEIGHTS_DIR=$(realpath -m "$WEIGHTS_DIR")
[ -n "${SUBMISSION:-}" ] && SUBMISSION=$(realpath -m "$SUBMISSION")
PREDICT=()
if [ "${1:-}" = "--predict-only" ]; then
    if [ -z "${2:-}" ] || [ ! -d "$2" ]; then
        echo "error: --predict-only needs the trained models' folder (a training run's WORK/models), not '${2:-}'" >&2
        exit 2
    fi
    PREDICT=(--predict-only --models "$(realpath -m "$2")"); shift 2
fi
if [ $# -eq 0 ]; then
    DATA=$(realpath -m demo_data)
    ARCHS=${ARCHS:-eva02_tiny convnext_atto}
    DEFAULT_TRAIN="--no-pretrained --epochs 6 --neg-per-pos 4 --batch-size 32 --lr 3e-4 --workers 0"
    DEFAULT_EXTRACT="--workers 0"
    DEFAULT_GBDT="--rounds 60 --bags 2"  # lighter than gbdt.py's defaults: the demo runs in 5 minutes on 2 cores
    LABELS=(--test-labels "$DATA/demo_test_labels.csv")  # the demo's hidden answers
    echo "demo: tiny settings (real data gets the production ones): ARCHS=$ARCHS;" \
        "train: ${TRAIN_ARGS:-$DEFAULT_TRAIN}; gbdt: ${GBDT_ARGS:-$DEFAULT_GBDT}"
else
    DATA=$(realpath -m "$1")
    ARCHS=${ARCHS:-eva02_base convnext}
    DEFAULT_TRAIN=""; DEFAULT_EXTRACT=""; DEFAULT_GBDT=""; LABELS=()
fi
cd "$here"
PY=${PYTHON:-python}
if [ $# -eq 0 ] && [ ! -f "$DATA/train-metadata.csv" ]; then
    "$PY" demo.py "$DATA" ${DEMO_ARGS:-}
fi
TRAIN=${TRAIN-$(for a in $ARCHS; do printf '%s:all ' "$a"; done)}
NGPU=${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
LAUNCH=("$PY")
[ "$NGPU" -gt 1 ] && LAUNCH=("$PY" -m torch.distributed.run --standalone "--nproc_per_node=$NGPU")
TIMES=()
stage() {  # stage NAME COMMAND...: runs it, records its time
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS rc=0
    "$@" || rc=$?  # explicit: under `stage ... || ...` bash would not stop at a failure inside
    TIMES+=("$(printf '%-24s %6ds' "$name" $((SECONDS - t0)))")
    return $rc
}
stage features "$PY" features.py --data "$DATA" --work "$WORK" ${FEATURES_ARGS:-} "${PREDICT[@]}"
if [ ${#PREDICT[@]} -eq 0 ]; then
    for spec in $TRAIN; do
        ARCH=${spec%%:*}
        W=()  # pretrained weights: WEIGHTS_DIR/ARCH.safetensors when given, else timm's local cache
        [ -n "${WEIGHTS_DIR:-}" ] && W=(--weights "$WEIGHTS_DIR/$ARCH.safetensors")
        [ "${RESUME:-0}" = 1 ] && W+=(--resume)
        [ -n "${DEADLINE:-}" ] && W+=(--deadline "$DEADLINE")
        # one process for the folds of one model: each fold's start is judged from the epochs before it
        stage "train $ARCH ${spec#*:}" "${LAUNCH[@]}" train_backbone.py --arch "$ARCH" --fold "${spec#*:}" \
            --data "$DATA" --work "$WORK" ${TRAIN_ARGS:-$DEFAULT_TRAIN} "${W[@]}"
    done
fi
if [ "${FINISH:-1}" = 1 ]; then
    NAMES=tabular
    stage "gbdt tabular" "$PY" gbdt.py --work "$WORK" --name tabular ${GBDT_ARGS:-$DEFAULT_GBDT} "${PREDICT[@]}"
    for ARCH in $ARCHS; do
        stage "extract $ARCH" "${LAUNCH[@]}" extract.py --arch "$ARCH" --data "$DATA" --work "$WORK" \
            ${EXTRACT_ARGS:-$DEFAULT_EXTRACT} "${PREDICT[@]}"
        NAME=tab_$ARCH  # tab_eva02_base, tab_convnext: image models keep their --arch name everywhere
        stage "gbdt $NAME" "$PY" gbdt.py --work "$WORK" --name "$NAME" --image "$ARCH" ${GBDT_ARGS:-$DEFAULT_GBDT} "${PREDICT[@]}"
        NAMES=$NAMES,$NAME
    done
    if [ "$(wc -w <<< "$ARCHS")" -gt 1 ]; then  # one GBDT on every image model's score as well: the blend weights choose
        ALL=${ARCHS// /,}
        stage "gbdt tab_all" "$PY" gbdt.py --work "$WORK" --name tab_all --image "$ALL" ${GBDT_ARGS:-$DEFAULT_GBDT} "${PREDICT[@]}"
        NAMES=$NAMES,tab_all
    fi
    stage ensemble "$PY" ensemble.py --work "$WORK" --names "$NAMES" "${PREDICT[@]}"
    [ -n "${SUBMISSION:-}" ] && cp "$WORK/submission.csv" "$SUBMISSION"
    if [ ${#PREDICT[@]} -eq 0 ]; then
        stage report "$PY" report.py --work "$WORK" --data "$DATA" "${LABELS[@]}"
    else  # the submission is complete: a failing report must not void it
        stage report "$PY" report.py --work "$WORK" --data "$DATA" --predict-only \
            || echo "warning: the report failed (its error is above); $WORK/submission.csv is complete"
    fi
fi
echo "=== stage times"
printf '%s\n' "${TIMES[@]}"
printf '%-24s %6ds\n' total $SECONDS
if [ "${FINISH:-1}" = 1 ]; then
    echo "submission: $WORK/submission.csv   triage: $WORK/triage.csv   report: $WORK/report.html"
fi
if [ ${#PREDICT[@]} -eq 0 ]; then
    echo "models: $WORK/models"
fi
