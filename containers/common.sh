# shellcheck shell=bash disable=SC2034  # variables used by the scripts that source this file
# Shared by build.sh, export.sh, test.sh and test_autopet.sh (sourced, not run).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAMES=(amos_task1 amos_task2 autopet2)
ENGINE=
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# new_log PATH: PATH made an empty file anew, never written through a link planted there
new_log() {
    rm -f -- "$1"
    (set -o noclobber && : >"$1") || die "$1: cannot create the log file"
}

# check_private PATH: refuse PATH (when it exists) unless it is no symbolic link, owned by this user and not
# writable by group or others: podman's state holds a configuration, a `docker` put first on PATH and images
check_private() {
    local path=$1
    if [[ -L $path ]]; then
        die "$path: a symbolic link; refusing to use it (podman's state must be a folder of your own, see GCINFER_PODMAN_DIR)"
    fi
    [[ -e $path ]] || return 0
    if [[ ! -O $path ]]; then
        die "$path: owned by uid $(find "$path" -maxdepth 0 -printf %U), not by you (uid $(id -u)); refusing to use it" \
            "(set GCINFER_PODMAN_DIR to a folder of your own)"
    fi
    if [[ -n $(find "$path" -maxdepth 0 \( -perm -020 -o -perm -002 \)) ]]; then
        die "$path: writable by group or others ($(find "$path" -maxdepth 0 -printf %M)); refusing to use it (chmod go-w)"
    fi
}

# check_podman_dir [--create]: sets PODMAN_DIR, podman's state of containers/setup-podman.sh (GCINFER_PODMAN_DIR,
# default per user: $XDG_STATE_HOME/gcinfer-podman), and checks it and its entries with check_private; creates it
# (mode 0700) with --create
check_podman_dir() {
    local home=~ entry
    PODMAN_DIR=${GCINFER_PODMAN_DIR:-${XDG_STATE_HOME:-$home/.local/state}/gcinfer-podman}
    check_private "$PODMAN_DIR"
    [[ ${1:-} != --create || -d $PODMAN_DIR ]] || (umask 077 && mkdir -p -- "$PODMAN_DIR")
    for entry in bin bin/docker containers.conf storage.conf storage run base-image; do
        check_private "$PODMAN_DIR/$entry"
    done
}

# gc-amos-task1 for amos_task1
tag_of() { printf 'gc-%s\n' "${1//_/-}"; }

# docker when an engine answers, else podman when installed, else a clear error; sets ENGINE
select_engine() {
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
        # the configuration and storage of containers/setup-podman.sh, when it ran and nothing else is chosen
        if [[ -z ${CONTAINERS_CONF:-} ]] && check_podman_dir && [[ -f $PODMAN_DIR/containers.conf ]]; then
            export CONTAINERS_CONF=$PODMAN_DIR/containers.conf CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf
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
