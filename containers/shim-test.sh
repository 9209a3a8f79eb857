#!/usr/bin/env bash
# Run each image through Grand Challenge's own runtime, sagemaker-shim (pinned: containers/requirements/shim.txt),
# in exec mode (gc-<name>) and in invoke mode (gc-<name>-invoke), against a local S3 (moto) on the container's
# loopback, with the environment Grand Challenge sets and the model tarball of ./export.sh going through S3 and the
# shim's own extraction.
#
# Usage: containers/shim-test.sh [NAME...] [--fixtures DIR] [--dist DIR] [--host] [--no-build]
#   NAME        amos_task1, amos_task2, autopet2 (default: all); first `./build.sh --invoke NAME` (cached layers)
#   --no-build  test gc-<name> and gc-<name>-invoke as they are
#   --fixtures  test inputs and models (default .cache/fixtures)
#   --dist      where ./export.sh wrote <name>-model.tar.gz (default dist/)
#   --host      no container: the shim in a venv of its own (.cache/shim-venv) runs the entry points on the host
#
# Per image: a test-only image gc-<name>-shim-test FROM gc-<name> with the shim and moto in /opt/shim (the shipped
# image stays as it is, as Grand Challenge adds the shim itself); one task per fixture case and a task with a
# corrupt input (python -m gcinfer_dev.shim_tasks prepare); `sagemaker-shim invoke -t` per mode, run as root with
# --network none and only the capabilities the shim uses (RUN_FLAGS); then per task (python -m
# gcinfer_dev.shim_tasks check): return_code 0, the mode's duration, exactly the expected output keys, bytes
# identical to the library's host output, panimg imports the output; the corrupt task: non-zero return_code,
# nothing uploaded, the process's log names the file.
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/common.sh"

# Grand Challenge's flags; of root's capabilities only what the shim itself uses (chown of the extracted model,
# cleaning /input and /output of the user's files, starting the process as the image's user, signalling it): the
# algorithm's process runs as that user, with no capability left (as ./test.sh runs the images, --cap-drop ALL)
RUN_FLAGS=(--network none --security-opt no-new-privileges --memory 15g --memory-swap 15g --pids-limit 256
    --shm-size 128m --cap-drop ALL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER --cap-add SETUID
    --cap-add SETGID --cap-add KILL)
WORK=$ROOT/.cache/shim-test
FAILED=0

# the image's CMD (JSON) with the fixture's extra options appended
command_json() {
    local tag=$1 name=$2
    "$PY" - "$("$ENGINE" image inspect --format '{{json .Config.Cmd}}' "$tag")" "$(fixture_args "$name")" <<'PYTHON'
import json, sys
print(json.dumps(json.loads(sys.argv[1]) + sys.argv[2].split()))
PYTHON
}

fixture_args() { "$PY" -m gcinfer_dev.checks fixture-args "$1"; }

# the host's command of container NAME, as JSON: the entry point of docker/<name>/, plus serve in invoke mode
host_command_json() {
    local name=$1 mode=$2
    "$PY" - "$PY" "$ROOT/docker/$name/run_inference.py" "$mode" "$(fixture_args "$name")" <<'PYTHON'
import json, sys
python, script, mode, extra = sys.argv[1:]
print(json.dumps([python, script, *(["serve"] if mode == "invoke" else []), *extra.split()]))
PYTHON
}

build_test_image() {
    local name=$1 secret=()
    [[ -n ${PIP_CERT:-} && -s ${PIP_CERT:-} ]] && secret=(--secret "id=hostca,src=$PIP_CERT")
    log "$name: building $(tag_of "$name")-shim-test (the shim and moto over $(tag_of "$name"))"
    "$ENGINE" build --platform linux/amd64 --file "$ROOT/containers/shim/Dockerfile" "${secret[@]}" \
        --build-arg "IMAGE=$(tag_of "$name")" --tag "$(tag_of "$name")-shim-test" "$ROOT/containers"
}

# the shim in a venv of its own on the host (it declares Python 3.12 and runs on 3.11: no resolver, frozen pins)
host_shim() {
    SHIM_PY=$ROOT/.cache/shim-venv/bin/python
    [[ -x $SHIM_PY ]] && return 0
    python3 -m venv "$ROOT/.cache/shim-venv"
    "$SHIM_PY" -m pip install --quiet --no-deps --ignore-requires-python -r "$ROOT/containers/requirements/shim.txt"
}

run_mode() {
    local name=$1 mode=$2 work=$3 tag
    tag=$(tag_of "$name")
    [[ $mode == exec ]] || tag=$tag-invoke
    local args=(--tasks "$work/tasks-$mode.json" --mode "$mode" --model-key "$name-model.tar.gz")
    if [[ $HOST -eq 1 ]]; then
        "$SHIM_PY" "$ROOT/containers/shim/run-tasks.py" "$work" "$work/out/$mode" "${args[@]}" \
            --cmd "$(host_command_json "$name" "$mode")" --paths "$work/root-$mode"
        return
    fi
    args=(--tasks "/shim/tasks-$mode.json" --mode "$mode" --model-key "$name-model.tar.gz")
    "$ENGINE" run --rm --platform linux/amd64 --user root "${RUN_FLAGS[@]}" --volume "$work:/shim" \
        --mount type=volume,destination=/tmp --entrypoint /opt/shim/bin/python "$(tag_of "$name")-shim-test" \
        /opt/shim/run-tasks.py /shim "/shim/out/$mode" "${args[@]}" --cmd "$(command_json "$tag" "$name")" \
        --user "$("$ENGINE" image inspect --format '{{.Config.User}}' "$tag")"
}

test_image() {
    local name=$1 work=$WORK/$1 tarball=$DIST/$1-model.tar.gz mode
    [[ -f $tarball ]] || die "$tarball: no model tarball (run ./export.sh $name --no-build --models $FIXTURES)"
    rm -rf "$work"
    mkdir -p "$work"
    log "$name: tasks, their S3 files and the library's host outputs"
    "$PY" -m gcinfer_dev.shim_tasks prepare "$name" "$work" --fixtures "$FIXTURES" --model-tarball "$tarball"
    if [[ $HOST -eq 0 ]]; then
        [[ $BUILD -eq 0 ]] || "$ROOT/build.sh" --invoke "$name"
        build_test_image "$name"
    fi
    for mode in exec invoke; do
        log "$name: sagemaker-shim invoke, $mode mode"
        run_mode "$name" "$mode" "$work" || true # the shim's own exit code: 0 even when a task failed
        "$PY" -m gcinfer_dev.shim_tasks check "$name" "$work" --mode "$mode" || FAILED=1
    done
}

main() {
    local names=() name
    HOST=0
    BUILD=1
    FIXTURES=${GCINFER_FIXTURES:-$ROOT/.cache/fixtures}
    DIST=${DIST:-$ROOT/dist}
    while [[ $# -gt 0 ]]; do
        case $1 in
            --host) HOST=1 ;;
            --no-build) BUILD=0 ;;
            --fixtures) FIXTURES=${2:?--fixtures needs a folder}; shift ;;
            --dist) DIST=${2:?--dist needs a folder}; shift ;;
            -*) die "unknown option $1 (see the header of $0)" ;;
            *) check_name "$1"; names+=("$1") ;;
        esac
        shift
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${NAMES[@]}")
    FIXTURES=$(cd "$FIXTURES" && pwd)
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
    if [[ $HOST -eq 1 ]]; then host_shim; else select_engine; fi
    for name in "${names[@]}"; do test_image "$name"; done
    [[ $FAILED -eq 0 ]] || die "FAILED (work folder kept: ${WORK#"$ROOT"/})"
    log "all passed"
}

main "$@"
