#!/usr/bin/env bash
# `make container-test`: build the three images from their Dockerfiles, run them with Grand Challenge's flags
# (./test.sh, and ./test_autopet.sh on a generated 3-study dataset), export them, and check that every archive loads. Works on a Docker host and on a host without one (Debian:
# podman, set up by containers/setup-podman.sh, with a CPU stand-in for the base image, which cannot be pulled).
#
# Usage: containers/container-test.sh [--fixtures DIR]     (the fixtures are made by `make fixtures`)
# Prints the time of every phase. Environment: GCINFER_PODMAN_DIR (podman's state, see setup-podman.sh).
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/common.sh"

FIXTURES=${GCINFER_FIXTURES:-$ROOT/.cache/fixtures}
TIMES=()
STAND_IN=0
START=$SECONDS

# phase TITLE COMMAND...: run and time one phase; on failure print the times so far and stop
phase() {
    local title=$1 start=$SECONDS code=0
    shift
    log "== $title"
    "$@" || code=$?
    TIMES+=("$(printf '%-34s %5ss  %s' "$title" "$((SECONDS - start))" "$([[ $code -eq 0 ]] && echo ok || echo "FAILED ($code)")")")
    [[ $code -eq 0 ]] && return 0
    report
    exit "$code"
}

report() {
    printf '\n'
    printf '%s\n' "${TIMES[@]}"
    printf '%-34s %5ss\n' "container-test total" "$((SECONDS - START))"
    df -h "${GCINFER_PODMAN_DIR:-/var/tmp/gcinfer-podman}" "$ROOT" | sed 's/^/  /'
}

setup_engine() {
    local environment
    environment=$("$ROOT/containers/setup-podman.sh")
    eval "$environment"
    [[ $environment == *CONTAINERS_CONF* ]] && STAND_IN=1
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
    "$ROOT/test_autopet.sh" "$dataset" --no-build --jobs 2 --model "$FIXTURES/autopet2/model"
}

# every dist/<tag>.tar.gz loads and yields the image that was built; every model tarball lists its files
check_archives() {
    local name tag built loaded files
    UNZIP=(gunzip -c)
    command -v pigz >/dev/null && UNZIP=(pigz -dc)
    for name in "${NAMES[@]}"; do
        tag=$(tag_of "$name")
        built=$(docker image inspect --format '{{.Id}}' "$tag")
        "${UNZIP[@]}" "$ROOT/dist/$tag.tar.gz" | docker load >"$ROOT/dist/.load.log" 2>&1 \
            || { cat "$ROOT/dist/.load.log" >&2; die "dist/$tag.tar.gz does not load"; }
        loaded=$(docker image inspect --format '{{.Id}}' "$tag")
        [[ $loaded == "$built" ]] || die "dist/$tag.tar.gz loads as $loaded, not the built image $built"
        files=$(tar -tzf "$ROOT/dist/$name-model.tar.gz" | grep -vc '/$' || true)
        [[ $files -gt 0 ]] || die "dist/$name-model.tar.gz holds no file"
        log "dist/$tag.tar.gz loads as $tag (${built:0:12}); dist/$name-model.tar.gz holds $files file(s)"
    done
    rm -f "$ROOT/dist/.load.log"
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
    [[ $STAND_IN -eq 0 ]] || phase "stand-in base image" "$ROOT/containers/make-base-image.sh"
    phase "./build.sh" "$ROOT/build.sh"
    phase "./test.sh --no-build" "$ROOT/test.sh" --no-build --fixtures "$FIXTURES"
    phase "./test_autopet.sh (3 studies)" test_autopet
    phase "./export.sh --no-build" "$ROOT/export.sh" --no-build --models "$FIXTURES"
    phase "containers/shim-test.sh" "$ROOT/containers/shim-test.sh" --fixtures "$FIXTURES"
    phase "archives load" check_archives
    docker image prune --force >/dev/null
    report
}

main "$@"
