#!/usr/bin/env bash
# The whole pipeline, every stage in order; stops at the first failing stage.
#   bash run.sh            # makes the demo set (demo_data/) and runs the tiny settings on CPU
#   bash run.sh DATA_DIR   # real data (the Kaggle folder), production settings
# WORK=dir chooses the work directory (default: work).
set -euo pipefail
cd "$(dirname "$0")"
WORK=${WORK:-work}
if [ $# -eq 0 ]; then
    DATA=demo_data
    [ -f $DATA/train-metadata.csv ] || python common.py demo $DATA
else
    DATA=$1
fi
TIMES=()
stage() {  # stage NAME COMMAND...: runs it, records its time
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@"
    TIMES+=("$(printf '%-28s %5ds' "$name" $((SECONDS - t0)))")
}
stage features       python features.py --data "$DATA" --work "$WORK"
stage gbdt_tabular   python gbdt.py --data "$DATA" --work "$WORK" --name tabular
stage ensemble       python ensemble.py --data "$DATA" --work "$WORK" --models tabular
echo "=== stage times"
printf '%s\n' "${TIMES[@]}"
printf '%-28s %5ds\n' total $SECONDS
echo "submission: $WORK/submission.csv   report: $WORK/report.md"
