#!/usr/bin/env bash
# tini, the image's init (Dockerfile ENTRYPOINT), on this machine too, so that
# tests/deploy/test_container_like.py runs the image's exact ENTRYPOINT + CMD. Installed as
# root through apt-get, at the version the Dockerfile pins (its ARG TINI_VERSION). Without
# root or apt-get, or if that version is not in this machine's Debian, nothing is installed
# and the test runs CMD without the init (it says so).
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v tini >/dev/null 2>&1; then
  echo "tini: present ($(tini --version))"
  exit 0
fi
version="$(sed -n 's/^ARG TINI_VERSION=//p' Dockerfile)"
if [ -z "$version" ]; then
  echo "ensure-tini: no ARG TINI_VERSION in the Dockerfile" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "tini: not installed (needs root and apt-get); the container-like test runs without it"
  exit 0
fi
install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "tini=$version" >/dev/null
}
echo "installing tini=$version (Debian package, as pinned in the Dockerfile)"
if ! install 2>/dev/null; then
  apt-get update -qq
  install || echo "tini=$version is not available here; the container-like test runs without it"
fi
