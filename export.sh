#!/usr/bin/env bash
# Build the images, then write what Grand Challenge takes: the image archive and the model tarball.
#
# Usage: ./export.sh [NAME...] [--no-build | --models-only] [--models DIR] [BUILD FLAGS...]
#   --models-only              write only the model tarballs (no build, no image archive, no container engine)
#   dist/<tag>.tar.gz          `docker save` of the image, gzipped (Algorithm > Containers > upload)
#   dist/<name>-model.tar.gz   the contents of DIR/<name>/model/ (Algorithm > Models > upload; Grand Challenge
#                              extracts it to /opt/ml/model). DIR defaults to docker/, i.e. docker/<name>/model/;
#                              without that folder no model tarball is written (weights baked in, or none yet).
#                              Links (symbolic or hard) are stored as what they point to (a dangling one is an
#                              error); every entry is owned by 0:0 and readable by all (files 0644, or 0755 when
#                              executable; folders 0755), so that the image's non-root user can read the weights.
#                              nnU-Net v1 checkpoints are packed slim (python -m gcinfer_dev.slim: no optimizer
#                              state; bytes before and after are printed).
# Build flags (from the first unknown argument starting with '-') go to ./build.sh.
set -euo pipefail
# shellcheck source=containers/common.sh
source "$(dirname "$0")/containers/common.sh"

DIST=${DIST:-$ROOT/dist}

save_image() {
    local tag=$1 archive=$DIST/$1.tar.gz
    log "saving $tag -> ${archive#"$ROOT"/}"
    local gzip=(gzip -1)
    command -v pigz >/dev/null && gzip=(pigz -1)
    rm -f -- "$archive.part"
    "$ENGINE" save "$tag" | "${gzip[@]}" >"$archive.part"
    mv "$archive.part" "$archive"
}

# check_links FOLDER: every symbolic link under FOLDER (hidden entries aside) leads to a file or folder, no loop
check_links() {
    local problems
    problems=$(find -L "$1" -name '.?*' -prune -o -type l -print 2>&1) && [[ -z $problems ]] && return 0
    die "$1: symbolic link(s) that cannot be stored as what they point to (dangling, or a loop): ${problems//$'\n'/; }"
}

save_model() {
    local name=$1 folder=$2 archive=$DIST/$1-model.tar.gz
    if [[ ! -d $folder ]] || [[ -z $(ls -A "$folder") ]]; then
        log "no model folder $folder: ${archive#"$ROOT"/} not written"
        return 0
    fi
    check_links "$folder"
    local slim=$DIST/$1-model.slim
    rm -rf "$slim"
    if [[ -n $(find "$folder" -path '*/fold_*/*.model.pkl' -print -quit) ]]; then
        # nnU-Net v1 results folder: checkpoints without the optimizer state (still restorable by nnU-Net 1.7.1)
        "$PY" -m gcinfer_dev.slim "$folder" "$slim"
        folder=$slim
    fi
    log "packing $folder -> ${archive#"$ROOT"/}"
    rm -f -- "$archive.part"
    tar --create --gzip --dereference --hard-dereference --owner=0 --group=0 --numeric-owner --mode=u=rwX,go=rX \
        --no-wildcards-match-slash --exclude='.?*' --file "$archive.part" -C "$folder" . \
        || { rm -f -- "$archive.part"; die "cannot pack $folder"; }
    mv "$archive.part" "$archive"
    rm -rf "$slim"
}

main() {
    local names=() build=1 images=1 models=$ROOT/docker flags=() name
    while [[ $# -gt 0 ]]; do
        case $1 in
            --no-build) build=0 ;;
            --models-only) build=0 images=0 ;;
            --models) models=${2:?--models needs a folder}; shift ;;
            -*) flags=("$@"); break ;;
            *) check_name "$1"; names+=("$1") ;;
        esac
        shift
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${NAMES[@]}")
    [[ $build -eq 0 ]] || "$ROOT/build.sh" "${names[@]}" "${flags[@]}"
    [[ $images -eq 0 ]] || select_engine
    mkdir -p "$DIST"
    for name in "${names[@]}"; do
        [[ $images -eq 0 ]] || save_image "$(tag_of "$name")"
        save_model "$name" "$models/$name/model"
    done
    ls -l "$DIST"
}

main "$@"
