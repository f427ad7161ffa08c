//go:build tools

// Package controlplane pins the Kubernetes control plane that tests/k8s starts: the commands below are
// built by scripts/build_control_plane.sh from the module versions in go.mod.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
