#!/usr/bin/env bash
# The whole pipeline, every stage in order; stops at the first failing stage.
#   bash run.sh                                # makes the demo set (demo_data/), tiny settings, CPU
#   bash run.sh DATA_DIR                       # real data (the Kaggle folder), production settings
#   bash run.sh --predict-only MODELS DATA_DIR # a submission from trained models, no training
# Environment: WORK (default work); WEIGHTS_DIR, a folder with eva02_base.safetensors and
# convnext.safetensors (real data; without it the weights must be in timm's local cache).
set -euo pipefail
cd "$(dirname "$0")"
WORK=${WORK:-work}
PREDICT=()
if [ "${1:-}" = "--predict-only" ]; then
    PREDICT=(--predict-only --models "$2"); shift 2
fi
if [ $# -eq 0 ]; then
    DATA=demo_data
    [ -f $DATA/train-metadata.csv ] || python demo.py $DATA
    EVA=eva02_tiny; CNX=convnext_atto
    TRAIN="--no-pretrained --epochs 6 --neg-per-pos 4 --batch-size 32 --lr 3e-4 --workers 0"
    EXTRACT="--workers 0"
    LABELS="--test-labels $DATA/demo_test_labels.csv"  # the demo's hidden answers
else
    DATA=$1
    EVA=eva02_base; CNX=convnext
    TRAIN=""; EXTRACT=""; LABELS=""
fi
TIMES=()
stage() {  # stage NAME COMMAND...: runs it, records its time
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@"
    TIMES+=("$(printf '%-24s %6ds' "$name" $((SECONDS - t0)))")
}
stage features          python features.py --data "$DATA" --work "$WORK" "${PREDICT[@]}"
for ARCH in $EVA $CNX; do
    if [ ${#PREDICT[@]} -eq 0 ]; then
        W=""  # pretrained weights: WEIGHTS_DIR/ARCH.safetensors when given, else timm's local cache
        [ -n "${WEIGHTS_DIR:-}" ] && W="--weights $WEIGHTS_DIR/$ARCH.safetensors"
        stage "train $ARCH" python train_backbone.py --arch $ARCH --fold all --data "$DATA" --work "$WORK" $TRAIN $W
    fi
    stage "extract $ARCH" python extract.py --arch $ARCH --data "$DATA" --work "$WORK" $EXTRACT "${PREDICT[@]}"
done
stage "gbdt tabular"    python gbdt.py --work "$WORK" --name tabular "${PREDICT[@]}"
stage "gbdt tab_eva02"  python gbdt.py --work "$WORK" --name tab_eva02 --image $EVA "${PREDICT[@]}"
stage "gbdt tab_convnext" python gbdt.py --work "$WORK" --name tab_convnext --image $CNX "${PREDICT[@]}"
stage ensemble python ensemble.py --work "$WORK" --names tabular,tab_eva02,tab_convnext "${PREDICT[@]}"
stage report python report.py --work "$WORK" --data "$DATA" $LABELS ${PREDICT:+--predict-only}
echo "=== stage times"
printf '%s\n' "${TIMES[@]}"
printf '%-24s %6ds\n' total $SECONDS
echo "submission: $WORK/submission.csv   triage: $WORK/triage.csv   report: $WORK/report.html"
