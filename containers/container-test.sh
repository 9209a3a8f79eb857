#!/usr/bin/env bash
# `make container-test`: build the three images from their Dockerfiles, run them with Grand Challenge's flags
# (./test.sh, and ./test_autopet.sh on a generated 3-study dataset with a Dice target), export them, run them through
# Grand Challenge's runtime (containers/shim-test.sh), and check that every archive holds the built image (as
# `docker load` verifies it, without loading). Works on a Docker host and on a host without one (Debian: podman, set
# up by containers/setup-podman.sh, with a CPU stand-in for the base image, which cannot be pulled).
#
# Usage: containers/container-test.sh [--fixtures DIR]     (the fixtures are made by `make fixtures`)
# Prints the time of every phase. A phase stops at its first failing command; the cycle then stops, prints the
# times so far with that phase FAILED and the failing command, and exits non-zero.
# Environment: GCINFER_PODMAN_DIR (podman's state, see setup-podman.sh).
set -Eeuo pipefail
shopt -s inherit_errexit
# shellcheck source=containers/common.sh
source "$(dirname "$0")/common.sh"

FIXTURES=${GCINFER_FIXTURES:-$ROOT/.cache/fixtures}
AUTOPET_MIN_DICE=0.7  # the demo's lesion target, as ./test.sh checks it
TIMES=()
STAND_IN=0
START=$SECONDS
PHASE=
PHASE_START=0
PHASE_COMMAND=()
FAILED_AT=

# phase TITLE COMMAND...: run and time one phase in this shell, so that its exports reach the later phases.
# Never call it in a condition (`if`, `||`, `&&`): bash suspends set -e there, and a phase would run on after a
# failure. Under set -e here, a failing command ends the script, and on_exit reports the phase.
phase() {
    PHASE=$1 PHASE_START=$SECONDS
    shift
    PHASE_COMMAND=("$@")
    log "== $PHASE"
    "$@"
    TIMES+=("$(printf '%-34s %5ss  ok' "$PHASE" "$((SECONDS - PHASE_START))")")
    PHASE=
}

# ERR trap (inherited by functions: set -E): the command that failed; a phase's own command when it failed as a whole
trap 'FAILED_AT="${BASH_SOURCE[0]##*/} line $LINENO: $BASH_COMMAND"' ERR

# EXIT trap: a phase that did not finish failed; report it with the times so far
on_exit() {
    local code=$?
    [[ -n $PHASE ]] || return 0
    [[ $code -ne 0 ]] || code=1
    [[ $FAILED_AT != *': "$@"' ]] || FAILED_AT="${PHASE_COMMAND[*]#"$ROOT"/}"
    TIMES+=("$(printf '%-34s %5ss  FAILED (exit %s%s)' "$PHASE" "$((SECONDS - PHASE_START))" "$code" "${FAILED_AT:+, $FAILED_AT}")")
    report
    exit "$code"
}
trap on_exit EXIT

report() {
    local folders=("$ROOT")
    [[ $STAND_IN -eq 0 ]] || folders+=("$PODMAN_DIR")
    printf '\n'
    printf '%s\n' "${TIMES[@]}"
    printf '%-34s %5ss\n' "container-test total" "$((SECONDS - START))"
    df -h "${folders[@]}" | sed 's/^/  /' || true
}

setup_engine() {
    local environment
    environment=$("$ROOT/containers/setup-podman.sh")
    eval "$environment"
    if [[ $environment == *CONTAINERS_CONF* ]]; then
        STAND_IN=1
        check_podman_dir
    fi
    # a TLS-re-signing proxy: pip in the build trusts the host's CA bundle (./build.sh passes it as a secret)
    if [[ -z ${PIP_CERT:-} && -s /etc/ssl/certs/ca-certificates.crt ]]; then
        export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
    fi
}

# the AutoPET image scored study by study on a generated 3-study AutoPET NIfTI dataset
test_autopet() {
    local dataset=$ROOT/.cache/autopet-dataset
    rm -rf "$dataset"
    "$PY" -m gcinfer_dev.checks autopet-dataset "$dataset" --studies 3 --seed 0 >/dev/null
    "$ROOT/test_autopet.sh" "$dataset" --no-build --jobs 2 --model "$FIXTURES/autopet2/model" \
        --min-dice "$AUTOPET_MIN_DICE"
}

# every dist/<tag>.tar.gz holds the built image (what `docker load` verifies: the config's digest is the image ID,
# each layer's digest the config's diff_id; read as a stream, nothing loaded); every model tarball lists its files
check_archives() {
    local name tag built files
    UNZIP=(gunzip -c)
    command -v pigz >/dev/null && UNZIP=(pigz -dc)
    for name in "${NAMES[@]}"; do
        tag=$(tag_of "$name")
        built=$(docker image inspect --format '{{.Id}}' "$tag")
        [[ $built == sha256:* ]] || built=sha256:$built
        "${UNZIP[@]}" "$ROOT/dist/$tag.tar.gz" \
            | "$PY" -m gcinfer_dev.archives - --image-id "$built" --name "dist/$tag.tar.gz"
        files=$(tar -tzf "$ROOT/dist/$name-model.tar.gz" | grep -vc '/$' || true)
        [[ $files -gt 0 ]] || die "dist/$name-model.tar.gz holds no file"
        log "dist/$name-model.tar.gz holds $files file(s)"
    done
}

main() {
    [[ ${1:-} == --fixtures ]] && FIXTURES=${2:?--fixtures needs a folder}
    [[ -d $FIXTURES ]] || die "$FIXTURES: no fixtures (run: make fixtures)"
    FIXTURES=$(cd "$FIXTURES" && pwd)
    export GCINFER_FIXTURES=$FIXTURES
    START=$SECONDS
    phase "engine set-up" setup_engine
    # podman here means no Docker engine and, on these machines, no registry: a CPU stand-in for the base image;
    # a Docker host pulls the real base image in the build
    if [[ $STAND_IN -eq 1 ]]; then phase "stand-in base image" "$ROOT/containers/make-base-image.sh"; fi
    phase "./build.sh" "$ROOT/build.sh"
    phase "./test.sh --no-build" "$ROOT/test.sh" --no-build --fixtures "$FIXTURES"
    phase "./test_autopet.sh (3 studies)" test_autopet
    phase "./export.sh --no-build" "$ROOT/export.sh" --no-build --models "$FIXTURES"
    phase "containers/shim-test.sh" "$ROOT/containers/shim-test.sh" --fixtures "$FIXTURES"
    phase "archives hold the built images" check_archives
    docker image prune --force >/dev/null || log "could not remove the dangling images"
    report
}

main "$@"
