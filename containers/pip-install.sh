#!/bin/sh
# pip install inside the images' builds (docker/*/Dockerfile): the pinned closures of containers/requirements/ and
# the library, without the resolver (so that the base image's torch stays), without a cache, with temporary files
# in /var/tmp/build removed afterwards (/tmp stays empty: Grand Challenge mounts a fresh one), and trusting the CA
# bundle of the optional build secret `hostca` (a TLS-re-signing proxy: --secret id=hostca,src=<bundle>).
#
# Usage (in a Dockerfile): RUN --mount=type=secret,id=hostca,mode=0444 \
#     --mount=type=bind,source=containers,target=/var/tmp/containers sh /var/tmp/containers/pip-install.sh ARGS...
set -eu
export TMPDIR=/var/tmp/build PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$TMPDIR"
if [ -s /run/secrets/hostca ]; then
    export PIP_CERT=/run/secrets/hostca
fi
python -m pip install --no-deps "$@"
rm -rf "$TMPDIR"
