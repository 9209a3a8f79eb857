#!/usr/bin/env bash
# Score the AutoPET II container on a labelled dataset, one container run per study as Grand Challenge does.
#
# Usage: ./test_autopet.sh DATASET [--local] [--jobs N] [--model DIR] [--output DIR] [--min-dice D] [--no-build]
#   DATASET     AutoPET NIfTI layout <patient>/<study>/SUV.nii.gz, CTres.nii.gz, SEG.nii.gz, or a Grand
#               Challenge layout with labels: [input/]images/pet/<uuid>.mha, images/ct/<uuid>.mha, labels/<uuid>.mha
#   --local     run docker/autopet2/run_inference.py on the host instead of the container
#   --jobs N    studies run at the same time (default 1; each container may use up to 15 GB)
#   --model     weights mounted on /opt/ml/model (default docker/autopet2/model, else the fixture model)
#   --output    work folder (default .cache/test-autopet/<dataset name>): per study input/, output/, log.txt;
#               removed and made anew, so it must be empty, missing, or made by an earlier run (its stamp file
#               .test-autopet), and neither the dataset nor the model may lie in it, nor it in the dataset
#   --min-dice  fail unless the mean Dice over the studies with lesions is at least D (e.g. 0.7)
#   --no-build  use the image as it is (default: ./build.sh autopet2 first)
# Writes <output>/results.csv (per study: Dice, false-positive and false-negative volume in ml, status) and
# prints the challenge metrics' summary. A study that fails is reported; the others still run. Exit 1 when any
# study failed or the mean Dice is below --min-dice.
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/containers/common.sh"

NAME=autopet2
CONFIG=$ROOT/docker/$NAME/config.json
STAMP=.test-autopet
GC_FLAGS=(--network none --cap-drop ALL --security-opt no-new-privileges --memory 15g --memory-swap 15g
    --pids-limit 256 --shm-size 128m)

# run_study NAME INPUT: one study in, its label map out; writes <study>/status as "<exit code> <seconds>"
run_study() {
    local study=$1 input=$2 dir=$WORK/$1 start=$SECONDS code=0
    rm -rf "$dir/output" "$dir/status"
    mkdir -p "$dir/output"
    chmod 0777 "$dir/output"
    new_log "$dir/log.txt"
    if [[ $LOCAL -eq 1 ]]; then
        (cd "$ROOT/docker/$NAME" && GC_INPUT=$input GC_OUTPUT=$dir/output GC_MODEL=$MODEL "$PY" run_inference.py) \
            >>"$dir/log.txt" 2>&1 || code=$?
    else
        "$ENGINE" run --rm --platform linux/amd64 "${GC_FLAGS[@]}" "${GPU[@]}" \
            --volume "$input:/input:ro" --volume "$dir/output:/output" --volume "$MODEL:/opt/ml/model:ro" \
            --mount type=volume,destination=/tmp "$(tag_of "$NAME")" >>"$dir/log.txt" 2>&1 || code=$?
    fi
    printf '%s %s\n' "$code" "$((SECONDS - start))" >"$dir/status"
    return "$code"
}

progress() {
    local total=$1 finished=0 failed=0 width=30 filled bar rest line status code
    for status in "$WORK"/*/status; do
        [[ -f $status ]] || continue
        read -r code _ <"$status"
        finished=$((finished + 1))
        [[ $code == 0 ]] || failed=$((failed + 1))
    done
    filled=$((finished * width / total))
    printf -v bar '%*s' "$filled" ''
    printf -v rest '%*s' "$((width - filled))" ''
    line=$(printf '[%s%s] %d/%d studies, %d failed' "${bar// /#}" "${rest// /.}" "$finished" "$total" "$failed")
    if [[ -t 2 ]]; then printf '\r%s' "$line" >&2; else printf '%s\n' "$line" >&2; fi
}

run_all() {
    local total=${#STUDIES[@]} study input
    progress "$total"
    for study in "${STUDIES[@]}"; do
        input=${INPUTS[$study]}
        [[ $input != - ]] || continue  # could not be staged: already reported in its status and log.txt
        while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do wait -n || true; progress "$total"; done
        run_study "$study" "$input" &
    done
    while [[ $(jobs -rp | wc -l) -gt 0 ]]; do wait -n || true; progress "$total"; done
    [[ -t 2 ]] && printf '\n' >&2
    return 0
}

default_model() {
    if [[ -d $ROOT/docker/$NAME/model ]]; then
        echo "$ROOT/docker/$NAME/model"
    else
        log "no docker/$NAME/model: using the fixture model (phantom weights)"
        echo "${GCINFER_FIXTURES:-$ROOT/.cache/fixtures}/$NAME/model"
    fi
}

# fresh_work FOLDER DATASET DEFAULT: FOLDER removed and made anew with its stamp, unless that could delete data:
# FOLDER is, contains or lies in DATASET, contains the model, or (not being DEFAULT, the script's own cache) holds
# files but no stamp of an earlier run; sets WORK to FOLDER's physical path
fresh_work() {
    local folder dataset=$2
    folder=$(realpath -m -- "$1")
    [[ $dataset != "$folder" && $dataset != "$folder"/* ]] || die "$1: the output folder is or contains the dataset $dataset"
    [[ $folder != "$dataset"/* ]] || die "$1: the output folder lies in the dataset $dataset"
    [[ $MODEL != "$folder" && $MODEL != "$folder"/* ]] || die "$1: the output folder is or contains the model $MODEL"
    if [[ $1 != "$3" && -e $folder && ! -f $folder/$STAMP ]]; then
        [[ -d $folder ]] || die "$1: the output folder is a file"
        [[ -z $(ls -A -- "$folder") ]] || die "$1: the output folder holds files but no $STAMP of an earlier run;" \
            "refusing to delete them (choose an empty or new folder)"
    fi
    rm -rf -- "$folder"
    mkdir -p -- "$folder"
    printf 'made by test_autopet.sh: removed and made anew by its next run\n' >"$folder/$STAMP"
    WORK=$folder
}

main() {
    local dataset='' build=1 output='' min_dice=() study input
    LOCAL=0 JOBS=1 MODEL=''
    while [[ $# -gt 0 ]]; do
        case $1 in
            --local) LOCAL=1 ;;
            --no-build) build=0 ;;
            --jobs) JOBS=${2:?--jobs needs a number}; shift ;;
            --model) MODEL=${2:?--model needs a folder}; shift ;;
            --output) output=${2:?--output needs a folder}; shift ;;
            --min-dice) min_dice=(--min-dice "${2:?--min-dice needs a number}"); shift ;;
            -*) die "unknown option $1 (see the header of $0)" ;;
            *) [[ -z $dataset ]] || die "one DATASET only (got '$dataset' and '$1')"; dataset=$1 ;;
        esac
        shift
    done
    [[ -n $dataset ]] || die "usage: $0 DATASET [--local] [--jobs N] [--model DIR] [--output DIR] [--min-dice D] [--no-build]"
    [[ -d $dataset ]] || die "$dataset: dataset folder not found"
    [[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive number, got '$JOBS'"
    dataset=$(cd "$dataset" && pwd -P)
    [[ -n $MODEL ]] || MODEL=$(default_model)
    [[ -d $MODEL ]] || die "$MODEL: model folder not found"
    MODEL=$(cd "$MODEL" && pwd -P)
    local default
    default=$ROOT/.cache/test-autopet/$(basename "$dataset")
    fresh_work "${output:-$default}" "$dataset" "$default"
    GPU=()
    if [[ $LOCAL -eq 0 ]]; then
        [[ $build -eq 0 ]] || "$ROOT/build.sh" "$NAME"
        select_engine
        read -r -a GPU <<<"$(gpu_flags)"
    fi
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    log "staging the studies of $dataset in $WORK"
    "$PY" -m gcinfer_dev.checks autopet-stage "$dataset" "$WORK" --config "$CONFIG" >/dev/null
    STUDIES=()
    declare -gA INPUTS=()
    while IFS=$'\t' read -r study input _; do
        STUDIES+=("$study")
        INPUTS[$study]=$input
    done <"$WORK/studies.tsv"
    log "${#STUDIES[@]} studies, $JOBS at a time, weights $MODEL"
    run_all
    "$PY" -m gcinfer_dev.checks autopet-score "$WORK" --config "$CONFIG" --csv "$WORK/results.csv" "${min_dice[@]}"
}

main "$@"
