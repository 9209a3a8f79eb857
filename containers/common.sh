# shellcheck shell=bash disable=SC2034  # variables used by the scripts that source this file
# Shared by build.sh, export.sh, test.sh and test_autopet.sh (sourced, not run).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAMES=(amos_task1 amos_task2 autopet2)
ENGINE=
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# gc-amos-task1 for amos_task1
tag_of() { printf 'gc-%s\n' "${1//_/-}"; }

# docker when an engine answers, else podman when installed, else a clear error; sets ENGINE
select_engine() {
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
        # the configuration and storage of containers/setup-podman.sh, when it ran and nothing else is chosen
        local state=${GCINFER_PODMAN_DIR:-/var/tmp/gcinfer-podman}
        if [[ -z ${CONTAINERS_CONF:-} && -f $state/containers.conf ]]; then
            export CONTAINERS_CONF=$state/containers.conf CONTAINERS_STORAGE_CONF=$state/storage.conf
        fi
        log "no Docker engine answers: using podman"
    else
        die "no container engine: neither a Docker engine answers nor podman is installed (on Debian: eval \"\$(containers/setup-podman.sh)\")"
    fi
}

check_name() {
    local name=$1 known
    for known in "${NAMES[@]}"; do [[ $name == "$known" ]] && return 0; done
    die "unknown image '$name' (one of: ${NAMES[*]})"
}

# --gpus all when this host can give the container a GPU
gpu_flags() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        printf '%s\n' --gpus all
    fi
}
