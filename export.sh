#!/usr/bin/env bash
# Build the images, then write what Grand Challenge takes: the image archive and the model tarball.
#
# Usage: ./export.sh [NAME...] [--no-build] [--models DIR] [BUILD FLAGS...]
#   dist/<tag>.tar.gz          `docker save` of the image, gzipped (Algorithm > Containers > upload)
#   dist/<name>-model.tar.gz   the contents of DIR/<name>/model/ (Algorithm > Models > upload; Grand Challenge
#                              extracts it to /opt/ml/model). DIR defaults to docker/, i.e. docker/<name>/model/;
#                              without that folder no model tarball is written (weights baked in, or none yet).
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
    "$ENGINE" save "$tag" | "${gzip[@]}" >"$archive.part"
    mv "$archive.part" "$archive"
}

save_model() {
    local name=$1 folder=$2 archive=$DIST/$1-model.tar.gz
    if [[ ! -d $folder ]] || [[ -z $(ls -A "$folder") ]]; then
        log "no model folder $folder: ${archive#"$ROOT"/} not written"
        return 0
    fi
    local slim=$DIST/$1-model.slim
    rm -rf "$slim"
    if [[ -n $(find "$folder" -path '*/fold_*/*.model.pkl' -print -quit) ]]; then
        # nnU-Net v1 results folder: checkpoints without the optimizer state (still restorable by nnU-Net 1.7.1)
        "$PY" -m gcinfer_dev.slim "$folder" "$slim"
        folder=$slim
    fi
    log "packing $folder -> ${archive#"$ROOT"/}"
    tar --create --gzip --owner=0 --group=0 --numeric-owner --no-wildcards-match-slash --exclude='.?*' --file "$archive.part" -C "$folder" .
    mv "$archive.part" "$archive"
    rm -rf "$slim"
}

main() {
    local names=() build=1 models=$ROOT/docker flags=() name
    while [[ $# -gt 0 ]]; do
        case $1 in
            --no-build) build=0 ;;
            --models) models=${2:?--models needs a folder}; shift ;;
            -*) flags=("$@"); break ;;
            *) check_name "$1"; names+=("$1") ;;
        esac
        shift
    done
    [[ ${#names[@]} -gt 0 ]] || names=("${NAMES[@]}")
    [[ $build -eq 0 ]] || "$ROOT/build.sh" "${names[@]}" "${flags[@]}"
    select_engine
    mkdir -p "$DIST"
    for name in "${names[@]}"; do
        save_image "$(tag_of "$name")"
        save_model "$name" "$models/$name/model"
    done
    ls -l "$DIST"
}

main "$@"
