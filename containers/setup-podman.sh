#!/usr/bin/env bash
# Make `docker` work on a machine without a Docker engine, through podman (Debian bookworm).
#
# Usage: eval "$(containers/setup-podman.sh)"
#
# Prints the environment to evaluate: PATH gets a `docker` wrapper that execs podman with this
# project's containers.conf and storage (a shell alias would not reach the scripts). Does nothing but
# print a comment when a Docker engine already answers. Set-up facts: shared/notes/container-engine.md
# (runc, not crun; ulimits within this host's hard limits; cgroupfs; overlay storage of its own).
# GCINFER_PODMAN_DIR (default per user: ${XDG_STATE_HOME:-~/.local/state}/gcinfer-podman, created mode 0700)
# holds the configuration, the wrapper and the image storage; it survives `make clean`, so a second run reuses the
# base image and build cache. It is refused when it or an entry is a symbolic link, owned by another user, or
# writable by group or others.
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/common.sh"

PACKAGES=(podman buildah runc uidmap debootstrap pigz)

docker_engine_answers() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || die "podman is missing and there is no apt-get: install ${missing[*]}"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    log "installing ${missing[*]}"
    new_log "$PODMAN_DIR/apt.log"
    { "${sudo[@]}" apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >>"$PODMAN_DIR/apt.log" 2>&1 || { tail -n 20 "$PODMAN_DIR/apt.log" >&2; die "apt-get failed (log: $PODMAN_DIR/apt.log)"; }
}

# single_quoted TEXT: TEXT as one POSIX shell word
single_quoted() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

write_configuration() {
    local state=$PODMAN_DIR
    (umask 077 && mkdir -p "$state/bin" "$state/storage" "$state/run")
    cat >"$state/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    cat >"$state/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$state/storage"
runroot = "$state/run"
CONF
    {
        printf '#!/bin/sh\n# docker -> podman with the gcinfer configuration (written by containers/setup-podman.sh)\n'
        printf 'CONTAINERS_CONF=%s CONTAINERS_STORAGE_CONF=%s exec podman "$@"\n' \
            "$(single_quoted "$state/containers.conf")" "$(single_quoted "$state/storage.conf")"
    } >"$state/bin/docker"
    chmod 0755 "$state/bin/docker"
}

main() {
    if docker_engine_answers; then
        echo "# a Docker engine answers: nothing to set up"
        return 0
    fi
    check_podman_dir --create
    install_packages
    write_configuration
    "$PODMAN_DIR/bin/docker" info >/dev/null || die "podman does not run with $PODMAN_DIR/containers.conf"
    log "podman ready (storage in $PODMAN_DIR/storage)"
    # shellcheck disable=SC2016  # $PATH is for the caller's eval to expand
    printf 'export PATH=%q:"$PATH"\n' "$PODMAN_DIR/bin"
    printf 'export CONTAINERS_CONF=%q CONTAINERS_STORAGE_CONF=%q\n' "$PODMAN_DIR/containers.conf" "$PODMAN_DIR/storage.conf"
}

main "$@"
