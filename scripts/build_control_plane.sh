#!/usr/bin/env bash
# Builds the Kubernetes control plane that tests/k8s starts (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok) from the Go module proxy into a cache outside the clone:
#   ${FLEXLLM_CONTROL_PLANE_DIR:-$HOME/.cache/flexllm/controlplane}/<kubernetes version>/bin
# The versions are pinned in scripts/controlplane/go.mod (Kubernetes and etcd) and below (kwok). Idempotent:
# a stamp file records what was built, and a second run with the same pins does nothing.
# Prints the bin directory on its last line; tests/k8s/conftest.py looks there.
#
#   bash scripts/build_control_plane.sh            build (or reuse) the pinned control plane
#   bash scripts/build_control_plane.sh --pin VER  regenerate scripts/controlplane/go.mod for k8s.io/kubernetes VER
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
module="$here/controlplane"
KWOK_VERSION=v0.8.0

kubernetes_version() { awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$module/go.mod"; }

if [[ "${1:-}" == "--pin" ]]; then
  # Downstream convention: every k8s.io staging module that k8s.io/kubernetes replaces with ./staging/src/...
  # is replaced by its published v0.Y.Z twin.
  version="$2"
  staging="v0.${version#v1.}"
  upstream="$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  {
    printf 'module flexllm.ai/controlplane\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' \
      "$(awk '$1 == "go" {print $2; exit}' "$upstream")" "$version"
    awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// {printf "\t%s => %s %s\n", $1, $1, v}' "$upstream"
    printf ')\n'
  } > "$module/go.mod"
  (cd "$module" && go mod tidy)
  echo "pinned k8s.io/kubernetes $version; etcd follows its go.mod: $(grep 'go.etcd.io/etcd/server/v3 ' "$module/go.mod")"
  exit 0
fi

command -v go >/dev/null || { echo "build_control_plane: no Go toolchain on PATH" >&2; exit 3; }
k8s="$(kubernetes_version)"
bin="${FLEXLLM_CONTROL_PLANE_DIR:-$HOME/.cache/flexllm/controlplane}/$k8s/bin"
stamp="$bin/.stamp"
want="$(printf 'kubernetes %s\nkwok %s\n%s\n' "$k8s" "$KWOK_VERSION" "$(go version)"; sha256sum "$0" "$module/go.mod" "$module/go.sum" | cut -d" " -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "control plane $k8s already built"
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
rm -f "$stamp"
start=$SECONDS
# Two cores and a few GB: one package at a time keeps the linker of kube-apiserver within memory.
export GOFLAGS="-trimpath -mod=readonly ${GOFLAGS:-}" GOMAXPROCS="${GOMAXPROCS:-2}" CGO_ENABLED=0
# The version stamp `hack/lib/version.sh` gives a release build: servers report it, and helm and kubectl read it.
minor="${k8s#v1.}"
stamp_flags="-X k8s.io/component-base/version.gitVersion=$k8s -X k8s.io/component-base/version.gitMajor=1
  -X k8s.io/component-base/version.gitMinor=${minor%%.*} -X k8s.io/component-base/version.gitTreeState=clean
  -X k8s.io/client-go/pkg/version.gitVersion=$k8s -X k8s.io/client-go/pkg/version.gitMajor=1
  -X k8s.io/client-go/pkg/version.gitMinor=${minor%%.*} -X k8s.io/client-go/pkg/version.gitTreeState=clean"
build() {
  (cd "$module" && nice -n 10 go build -p 2 -ldflags="-s -w ${stamp_flags//$'\n'/ }" -o "$bin/$1" "$2")
  echo "built $1 ($((SECONDS - start)) s)"
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
# kwok's own go.mod pins its dependencies (no replace directives), so `go install` builds it as released.
(GOBIN="$bin" GOFLAGS="-trimpath" nice -n 10 go install -ldflags='-s -w' "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
# kwok's released "fast" stages (nodes Ready with a lease heartbeat; pods Ready at once, deleted when asked),
# from the same module version: tests/k8s passes them with --config.
kwok_source="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease pod/fast/pod-ready \
             pod/fast/pod-complete pod/fast/pod-delete; do
  printf -- '---\n'
  cat "$kwok_source/kustomize/stage/$stage.yaml"
done > "$bin/kwok-stages.yaml"
echo "built kwok ($((SECONDS - start)) s)"
echo "$want" > "$stamp"
echo "control plane $k8s built in $((SECONDS - start)) s"
echo "$bin"
