#!/usr/bin/env bash
# Make a CPU stand-in for the Dockerfiles' default base image, for hosts that cannot pull it.
#
# Usage: containers/make-base-image.sh [--force]
#
# The stand-in is Debian bookworm (debootstrap minbase) with a Python venv at /opt/conda holding the CPU
# torch wheel, `python`/`pip` first on PATH: what the Dockerfiles rely on in the official PyTorch image
# (/opt/conda/bin/python with torch importable). It is tagged with the exact name of the Dockerfiles'
# `ARG BASE_IMAGE` default, so `./build.sh` builds them unchanged and without a pull. Nothing is done
# when an image of that name exists already (unless --force). Uses `docker`, which
# containers/setup-podman.sh points at podman on hosts without a Docker engine.
# Environment: DEBIAN_MIRROR (default: the first Debian archive of a Debian release in this machine's own apt sources,
# GCINFER_APT_DIR/sources.list.d/*.sources, sources.list and sources.list.d/*.list; GCINFER_APT_DIR defaults to
# /etc/apt), TORCH_VERSION, GCINFER_PODMAN_DIR (the work folder's parent, see setup-podman.sh).
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/common.sh"

TORCH=${TORCH_VERSION:-2.13.0}
APT_DIR=${GCINFER_APT_DIR:-/etc/apt}
# a Debian release suite: an entry naming one is a Debian archive, which holds bookworm too (not -updates, -security,
# nor a third-party repository's own suite)
DEBIAN_SUITES='^(bullseye|bookworm|trixie|forky|sid|oldoldstable|oldstable|stable|testing|unstable)$'

default_base_image() {
    local names
    names=$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT"/docker/*/Dockerfile | sort -u)
    [[ -n $names ]] || die "no 'ARG BASE_IMAGE=' default in docker/*/Dockerfile"
    [[ $(wc -l <<<"$names") -eq 1 ]] || die "the Dockerfiles disagree on the base image: $(tr '\n' ' ' <<<"$names")"
    printf '%s\n' "$names"
}

# the URIs of the `deb` entries of a Debian release suite in apt's deb822 files
deb822_mirrors() {
    awk -v suite="$DEBIAN_SUITES" '
        function release(suites, n, names, i) {
            n = split(suites, names, " ")
            for (i = 1; i <= n; i++) if (names[i] ~ suite) return 1
            return 0
        }
        function flush() {
            if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no" && release(suites)) print uris
            types = uris = suites = enabled = ""
        }
        FNR == 1 { flush() }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { flush(); next }
        { field = tolower($1); $1 = ""; sub(/^ +/, "") }
        field == "types:" { types = $0 }
        field == "uris:" { uris = $1 }
        field == "suites:" { suites = $0 }
        field == "enabled:" { enabled = $1 }
        END { flush() }
    ' "$@"
}

# the same from one-line `deb [OPTIONS] URI SUITE COMPONENT...` files
one_line_mirrors() {
    awk -v suite="$DEBIAN_SUITES" '$1 == "deb" { sub(/\[[^]]*\][[:space:]]*/, ""); if ($3 ~ suite) print $2 }' "$@"
}

# sets MIRROR: DEBIAN_MIRROR, else the first Debian release archive of this machine's apt sources, else an error
find_mirror() {
    local found
    MIRROR=${DEBIAN_MIRROR:-}
    [[ -z $MIRROR ]] || return 0
    found=$(
        shopt -s nullglob
        deb822=("$APT_DIR"/sources.list.d/*.sources)
        one_line=("$APT_DIR"/sources.list "$APT_DIR"/sources.list.d/*.list)
        [[ ${#deb822[@]} -eq 0 ]] || deb822_mirrors "${deb822[@]}"
        for file in "${one_line[@]}"; do [[ ! -f $file ]] || one_line_mirrors "$file"; done
    )
    found=$(grep -m 1 -E '^(https?|file):' <<<"$found" || true)
    [[ -n $found ]] || die "no Debian archive in this machine's apt sources ($APT_DIR/sources.list.d/*.sources," \
        "$APT_DIR/sources.list): set DEBIAN_MIRROR to a Debian mirror's URL"
    MIRROR=$found
}

make_rootfs() {
    local rootfs=$WORK/rootfs
    command -v debootstrap >/dev/null || die "debootstrap is missing (containers/setup-podman.sh installs it)"
    rm -rf "$rootfs"
    log "debootstrap bookworm (minbase + python3-venv) from $MIRROR"
    new_log "$WORK/debootstrap.log"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >>"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    new_log "$WORK/import.log"
    tar --numeric-owner -C "$rootfs" -c . | docker import - gcinfer-stand-in-rootfs:bookworm >>"$WORK/import.log" 2>&1 \
        || { cat "$WORK/import.log" >&2; die "cannot import the root file system"; }
    rm -rf "$rootfs"
}

download_torch() {
    rm -rf "$WORK/context/wheels"
    mkdir -p "$WORK/context/wheels"
    log "pip download torch==$TORCH (CPU wheel and its dependencies)"
    "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_28_x86_64 \
        -d "$WORK/context/wheels" "torch==$TORCH" 2>&1 | grep -v 'is ignored' >&2 || true
    compgen -G "$WORK/context/wheels/torch-$TORCH*.whl" >/dev/null || die "no torch $TORCH wheel could be downloaded"
}

write_containerfile() {
    cat >"$WORK/context/Containerfile" <<'CONTAINERFILE'
FROM gcinfer-stand-in-rootfs:bookworm
RUN --mount=type=bind,source=wheels,target=/wheels \
    python3 -m venv /opt/conda \
    && /opt/conda/bin/pip install --no-cache-dir --no-index --disable-pip-version-check /wheels/*.whl \
    && /opt/conda/bin/python -c "import torch; print('torch', torch.__version__)"
ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /workspace
CONTAINERFILE
}

main() {
    local force=0 tag
    [[ ${1:-} == --force ]] && force=1
    docker info >/dev/null 2>&1 || die "no container engine answers: run eval \"\$(containers/setup-podman.sh)\" first"
    # the Dockerfiles' very name, unqualified: podman stores it as localhost/<name>, where FROM finds it locally
    tag=$(default_base_image)
    if [[ $force -eq 0 ]] && docker image inspect "$tag" >/dev/null 2>&1; then
        log "$tag exists: nothing to do"
        return 0
    fi
    find_mirror
    check_podman_dir --create
    WORK=$PODMAN_DIR/base-image
    (umask 077 && mkdir -p "$WORK")
    make_rootfs
    download_torch
    write_containerfile
    log "building the stand-in $tag"
    docker build --quiet --tag "$tag" "$WORK/context" >/dev/null
    docker rmi gcinfer-stand-in-rootfs:bookworm >/dev/null 2>&1 || true
    rm -rf "$WORK/context"
    log "stand-in ready: $tag"
}

main "$@"
