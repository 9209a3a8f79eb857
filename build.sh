#!/usr/bin/env bash
# Build the Grand Challenge images: all of them, or the named ones.
#
# Usage: ./build.sh [--invoke] [NAME...] [BUILD FLAGS...]
#   NAME: amos_task1 (tag gc-amos-task1), amos_task2 (gc-amos-task2), autopet2 (gc-autopet2)
#   --invoke: also the invoke-mode variant of each, gc-<name>-invoke (docker/invoke/Dockerfile: the same image
#             whose command starts the HTTP server of Grand Challenge's invoke mode)
#   BUILD FLAGS: passed to `docker build` from the first argument that starts with '-' on, e.g.
#                --build-arg BASE_IMAGE=... or --secret id=hostca,src=/path/to/ca-bundle.crt
# Uses docker; podman when no Docker engine answers. When PIP_CERT names a CA bundle (a TLS-re-signing
# proxy), it reaches pip inside the build as the secret 'hostca', never stored in a layer.
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/containers/common.sh"

main() {
    local names=() flags=() name invoke=0
    [[ ${1:-} == --invoke ]] && { invoke=1; shift; }
    while [[ $# -gt 0 && $1 != -* ]]; do check_name "$1"; names+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift
    flags=("$@")
    [[ ${#names[@]} -gt 0 ]] || names=("${NAMES[@]}")
    if [[ -n ${PIP_CERT:-} && -s ${PIP_CERT:-} ]]; then
        flags=(--secret "id=hostca,src=$PIP_CERT" "${flags[@]}")
    fi
    select_engine
    for name in "${names[@]}"; do
        log "building $(tag_of "$name") from docker/$name/Dockerfile"
        "$ENGINE" build --platform linux/amd64 --file "$ROOT/docker/$name/Dockerfile" \
            --tag "$(tag_of "$name")" "${flags[@]}" "$ROOT"
        [[ $invoke -eq 1 ]] || continue
        log "building $(tag_of "$name")-invoke from docker/invoke/Dockerfile"
        "$ENGINE" build --platform linux/amd64 --file "$ROOT/docker/invoke/Dockerfile" \
            --build-arg "IMAGE=$(tag_of "$name")" --tag "$(tag_of "$name")-invoke" "$ROOT/docker/invoke"
    done
}

main "$@"
