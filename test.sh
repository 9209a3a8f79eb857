#!/usr/bin/env bash
# Run each image on its test input as Grand Challenge does, and check every output.
#
# Usage: ./test.sh [NAME...] [--local] [--no-build] [--fixtures DIR] [--keep]
#   NAME        amos_task1, amos_task2, autopet2 (default: all)
#   --local     run the same entry points (docker/<name>/run_inference.py) on the host, no container engine
#               (the grand-challenge runs only); the comparison with the library's host run is then of the same
#               code on the same host: it checks the entry point, sockets and files, not the numerics (make test
#               checks those against nnU-Net v1 and MONAI)
#   --no-build  test the images as they are (default: ./build.sh NAME... first)
#   --fixtures  test inputs and models (default .cache/fixtures; made by `gcinfer make-fixtures` when missing)
#   --keep      keep the work folder .cache/test-sh (inputs, outputs, logs); default: removed when all pass
#
# Runs (per image):
#   grand-challenge  /input (read-only: inputs.json, images/<socket>/<case>.mha) -> /output, /opt/ml/model (read-only), a fresh
#                    volume on /tmp, flags: --network none --cap-drop ALL --security-opt no-new-privileges
#                    --memory 15g --memory-swap 15g --pids-limit 256 --shm-size 128m (+ --gpus all with a GPU)
#   workspace        AMOS only, as the AMOS 2022 organisers ran it: `python run_inference.py` without
#                    arguments, as root, flat *.nii.gz in /workspace/input (read-only) -> /workspace/output;
#                    on the first case; the model folder then offers all five folds (folds 2-4 are links to
#                    the fixture's folds 0 and 1)
#   image            the image runs as a non-root user, is linux/amd64, and has an empty /tmp
# Checks (python -m gcinfer_dev.checks outputs): the expected files and only those, uint8 on each input's grid,
# voxel-identical to the library's output for the same input and weights computed here on the host, and the
# mean Dice against the phantom ground truth at or above the demo's target (AMOS organs 0.8, AutoPET lesions 0.7).
# Exit 0 only if every run passes; a summary table at the end.
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/containers/common.sh"

GC_FLAGS=(--network none --cap-drop ALL --security-opt no-new-privileges --memory 15g --memory-swap 15g
    --pids-limit 256 --shm-size 128m)
WORK=$ROOT/.cache/test-sh
REFERENCES=$ROOT/.cache/test-sh-references
ROWS=()
FAILED=0

# record NAME MODE STATUS SECONDS DETAIL
record() {
    ROWS+=("$(printf '%-11s %-16s %-6s %7s  %s' "$@")")
    [[ $3 == pass ]] || FAILED=1
}

# the fixtures, made by `gcinfer make-fixtures` unless a complete set is there (its .stamp; `make fixtures`
# refreshes them when the fixture code changed)
ensure_fixtures() {
    [[ -f $FIXTURES/.stamp ]] && return 0
    log "making the fixtures in $FIXTURES (gcinfer make-fixtures --seed 0; a few minutes)"
    "$PY" -m gcinfer.cli --quiet make-fixtures "$FIXTURES" --seed 0
}

# five_fold_model SOURCE TARGET: the fixture model with fold_2..4 hard-linked to fold_0/fold_1, so that the
# config's default folds (0-4) exist for a run without arguments
five_fold_model() {
    local source=$1 target=$2 configuration fold
    rm -rf "$target"
    cp -al "$source" "$target"
    for configuration in "$target"/*/; do
        for fold in 2 3 4; do
            [[ -d $configuration/fold_$fold ]] || cp -al "$configuration/fold_$((fold % 2))" "$configuration/fold_$fold"
        done
    done
}

# host_reference NAME INPUT MODEL [ARGS...]: the library's own output on the host (CPU), computed once per
# library version, config, input, weights and options (cached in .cache/test-sh-references); sets REFERENCE
host_reference() {
    local name=$1 input=$2 model=$3 config=$ROOT/docker/$1/config.json key
    shift 3
    key=$("$PY" -m gcinfer_dev.checks fingerprint "$config" "$input" "$model" --extra "$name $*")
    REFERENCE=$REFERENCES/$name-$key
    [[ -d $REFERENCE ]] && return 0
    rm -rf "$REFERENCE.part"
    mkdir -p "$REFERENCES"
    if "$PY" -m gcinfer.cli --quiet --no-progress "$(command_of "$name")" --input "$input" \
        --output "$REFERENCE.part" --model "$model" --config "$config" --device cpu "$@" >"$REFERENCE.log" 2>&1; then
        mv "$REFERENCE.part" "$REFERENCE"
        return 0
    fi
    tail -n 20 "$REFERENCE.log" >&2
    record "$name" reference FAIL - "the library's own run failed on the host (${REFERENCE#"$ROOT"/}.log)"
    return 1
}

# the gcinfer command of a container folder: amos_task1 -> amos-task1
command_of() { printf '%s\n' "${1//_/-}"; }

fresh_output() { rm -rf "$1" && mkdir -p "$1" && chmod 0777 "$1"; }

# run_grand_challenge NAME INPUT OUTPUT MODEL LOG [ARGS...]
run_grand_challenge() {
    local name=$1 input=$2 output=$3 model=$4 logfile=$5
    shift 5
    if [[ $LOCAL -eq 1 ]]; then
        (cd "$ROOT/docker/$name" && GC_INPUT=$input GC_OUTPUT=$output GC_MODEL=$model "$PY" run_inference.py "$@") \
            >"$logfile" 2>&1
        return
    fi
    local command=()
    [[ $# -eq 0 ]] || command=(python run_inference.py "$@")
    "$ENGINE" run --rm --platform linux/amd64 "${GC_FLAGS[@]}" "${GPU[@]}" \
        --volume "$input:/input:ro" --volume "$output:/output" --volume "$model:/opt/ml/model:ro" \
        --mount type=volume,destination=/tmp \
        "$(tag_of "$name")" "${command[@]}" >"$logfile" 2>&1
}

# run_workspace NAME INPUT OUTPUT MODEL LOG: no arguments, as the AMOS organisers ran it
run_workspace() {
    local name=$1 input=$2 output=$3 model=$4 logfile=$5
    "$ENGINE" run --rm --platform linux/amd64 --user root "${GC_FLAGS[@]}" "${GPU[@]}" \
        --volume "$input:/workspace/input:ro" --volume "$output:/workspace/output" \
        --volume "$model:/opt/ml/model:ro" --mount type=volume,destination=/tmp \
        "$(tag_of "$name")" python run_inference.py >"$logfile" 2>&1
}

# check_run NAME MODE SECONDS INPUT OUTPUT REFERENCE: python -m gcinfer_dev.checks outputs, recorded
check_run() {
    local name=$1 mode=$2 seconds=$3 input=$4 output=$5 reference=$6 report=$5.check
    if "$PY" -m gcinfer_dev.checks outputs "$name" --config "$ROOT/docker/$name/config.json" --input "$input" \
        --output "$output" --reference "$reference" --labels "$FIXTURES/$name/labels" \
        --max-mismatch "$MAX_MISMATCH" --reference-name "$REFERENCE_NAME" >"$report" 2>&1; then
        record "$name" "$mode" pass "$seconds" "$(tail -n 1 "$report")"
    else
        sed 's/^/    /' "$report" >&2
        record "$name" "$mode" FAIL "$seconds" "$(grep -m 1 FAILED "$report" || tail -n 1 "$report")"
    fi
}

# timed_run NAME MODE LOG FUNCTION ARGS...: run, print the log's tail on failure; sets ELAPSED
timed_run() {
    local name=$1 mode=$2 logfile=$3 start=$SECONDS
    shift 3
    if "$@"; then
        ELAPSED=$((SECONDS - start))
        return 0
    fi
    ELAPSED=$((SECONDS - start))
    log "$name $mode: the run failed; last lines of $logfile:"
    tail -n 25 "$logfile" >&2
    record "$name" "$mode" FAIL "${ELAPSED}s" "run failed (log: ${logfile#"$ROOT"/})"
    return 1
}

check_image() {
    local name=$1 tag user platform tmp
    tag=$(tag_of "$name")
    user=$("$ENGINE" image inspect --format '{{.Config.User}}' "$tag")
    platform=$("$ENGINE" image inspect --format '{{.Os}}/{{.Architecture}}' "$tag")
    tmp=$("$ENGINE" run --rm --network none --entrypoint ls "$tag" -A /tmp)
    if [[ -n $user && $user != root && $user != 0 && $platform == linux/amd64 && -z $tmp ]]; then
        record "$name" image pass - "user '$user', $platform, /tmp empty"
    else
        record "$name" image FAIL - "user '$user' (must be non-root), $platform, /tmp: ${tmp:-empty}"
    fi
}

test_image() {
    local name=$1 dir=$WORK/$1 args=()
    local fixture=$FIXTURES/$name
    read -r -a args <<<"$("$PY" -m gcinfer_dev.checks fixture-args "$name")"
    mkdir -p "$dir"
    [[ $LOCAL -eq 1 ]] || check_image "$name"
    log "$name: the library's reference output on the host"
    host_reference "$name" "$fixture/input" "$fixture/model" "${args[@]}" || return 0
    local reference=$REFERENCE
    local input=$dir/gc-input
    "$PY" -m gcinfer_dev.checks gc-input "$fixture/input" "$input" --config "$ROOT/docker/$name/config.json" >/dev/null
    log "$name: grand-challenge run"
    fresh_output "$dir/gc-output"
    if timed_run "$name" grand-challenge "$dir/gc.log" \
        run_grand_challenge "$name" "$input" "$dir/gc-output" "$fixture/model" "$dir/gc.log" "${args[@]}"; then
        check_run "$name" grand-challenge "${ELAPSED}s" "$input" "$dir/gc-output" "$reference"
    fi
    # the workspace run needs /workspace, i.e. a container (its defaults are unit-tested in tests/test_scripts.py)
    [[ $name == amos_* && $LOCAL -eq 0 ]] || return 0
    log "$name: workspace run (no arguments, as root, five folds, first case)"
    local first
    first=$(find "$fixture/input" -maxdepth 1 -name '*.nii.gz' | sort | head -n 1)
    mkdir -p "$dir/workspace-input"
    cp -l "$first" "$dir/workspace-input/" 2>/dev/null || cp "$first" "$dir/workspace-input/"
    five_fold_model "$fixture/model" "$dir/model-5-folds"
    host_reference "$name" "$dir/workspace-input" "$dir/model-5-folds" || return 0
    fresh_output "$dir/workspace-output"
    if timed_run "$name" workspace "$dir/workspace.log" run_workspace "$name" "$dir/workspace-input" \
        "$dir/workspace-output" "$dir/model-5-folds" "$dir/workspace.log"; then
        check_run "$name" workspace "${ELAPSED}s" "$dir/workspace-input" "$dir/workspace-output" "$REFERENCE"
    fi
}

# files written by the container's user: hand them back to a non-root caller so that they can be removed
reclaim_work() {
    [[ $LOCAL -eq 1 || $(id -u) -eq 0 ]] && return 0
    "$ENGINE" run --rm --network none --user root --volume "$WORK:/work" --entrypoint chown "$(tag_of "$1")" \
        -R "$(id -u):$(id -g)" /work || log "could not hand back the files in $WORK"
}

print_summary() {
    printf '\n%-11s %-16s %-6s %7s  %s\n' image run result time details
    printf '%s\n' "${ROWS[@]}"
}

main() {
    local names=() build=1 keep=0 name
    LOCAL=0
    FIXTURES=${GCINFER_FIXTURES:-$ROOT/.cache/fixtures}
    while [[ $# -gt 0 ]]; do
        case $1 in
            --local) LOCAL=1 ;;
            --no-build) build=0 ;;
            --keep) keep=1 ;;
            --fixtures) FIXTURES=${2:?--fixtures needs a folder}; shift ;;
            -*) die "unknown option $1 (see the header of $0)" ;;
            *) check_name "$1"; names+=("$1") ;;
        esac
        shift
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${NAMES[@]}")
    FIXTURES=$(mkdir -p "$FIXTURES" && cd "$FIXTURES" && pwd)
    GPU=()
    MAX_MISMATCH=0
    REFERENCE_NAME="the library's host run"
    if [[ $LOCAL -eq 1 ]]; then
        REFERENCE_NAME="gcinfer.cli (same code, same host: an entry-point check)"
        log "--local: outputs are compared with gcinfer.cli's on the same host, i.e. the library with itself"
    else
        [[ $build -eq 0 ]] || "$ROOT/build.sh" "${names[@]}"
        select_engine
        read -r -a GPU <<<"$(gpu_flags)"
        # the container predicts on the GPU (fp16), the host reference on the CPU: allow 0.1% of the voxels
        [[ ${#GPU[@]} -eq 0 ]] || MAX_MISMATCH=0.001
    fi
    ensure_fixtures
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    rm -rf "$WORK"
    mkdir -p "$WORK"
    for name in "${names[@]}"; do test_image "$name"; done
    reclaim_work "${names[0]}"
    print_summary
    if [[ $FAILED -eq 0 && $keep -eq 0 ]]; then rm -rf "$WORK"; fi
    [[ $FAILED -eq 0 ]] || { log "FAILED (work folder kept: ${WORK#"$ROOT"/})"; exit 1; }
    log "all passed"
}

main "$@"
