#!/usr/bin/env bash
# Make `docker` work on a machine without a Docker engine, through podman (Debian bookworm).
#
# Usage: eval "$(containers/setup-podman.sh)"
#
# Prints the environment to evaluate: PATH gets a `docker` wrapper that execs podman with this
# project's containers.conf and storage (a shell alias would not reach the scripts). Does nothing but
# print a comment when a Docker engine already answers. Set-up facts: shared/notes/container-engine.md
# (runc, not crun; ulimits within this host's hard limits; cgroupfs; overlay storage of its own).
# GCINFER_PODMAN_DIR (default /var/tmp/gcinfer-podman) holds the configuration, the wrapper and the
# image storage; it survives `make clean`, so a second run reuses the base image and build cache.
set -euo pipefail

STATE=${GCINFER_PODMAN_DIR:-/var/tmp/gcinfer-podman}
PACKAGES=(podman buildah runc uidmap debootstrap pigz)

log() { printf 'setup-podman: %s\n' "$*" >&2; }

docker_engine_answers() {
    command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || { log "podman is missing and there is no apt-get: install ${missing[*]}"; exit 1; }
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    log "installing ${missing[*]}"
    mkdir -p "$STATE"
    { "${sudo[@]}" apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >"$STATE/apt.log" 2>&1 || { tail -n 20 "$STATE/apt.log" >&2; log "apt-get failed (log: $STATE/apt.log)"; exit 1; }
}

write_configuration() {
    mkdir -p "$STATE/bin" "$STATE/storage" "$STATE/run"
    cat >"$STATE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    cat >"$STATE/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
CONF
    cat >"$STATE/bin/docker" <<WRAPPER
#!/bin/sh
# docker -> podman with the gcinfer configuration (written by containers/setup-podman.sh)
CONTAINERS_CONF="$STATE/containers.conf" CONTAINERS_STORAGE_CONF="$STATE/storage.conf" exec podman "\$@"
WRAPPER
    chmod +x "$STATE/bin/docker"
}

main() {
    if docker_engine_answers; then
        echo "# a Docker engine answers: nothing to set up"
        return 0
    fi
    install_packages
    write_configuration
    "$STATE/bin/docker" info >/dev/null || { log "podman does not run with $STATE/containers.conf"; exit 1; }
    log "podman ready (storage in $STATE/storage)"
    # shellcheck disable=SC2016  # $PATH is for the caller's eval to expand
    printf 'export PATH=%q:"$PATH"\n' "$STATE/bin"
    printf 'export CONTAINERS_CONF=%q CONTAINERS_STORAGE_CONF=%q\n' "$STATE/containers.conf" "$STATE/storage.conf"
}

main "$@"
