#!/usr/bin/env bash
# End-to-end run on a real cluster: kind with the NVIDIA GPU(s) of this host, the chart, the examples.
# Needs: docker with the NVIDIA container toolkit (nvidia as the default runtime), kind, kubectl, helm.
#   bash scripts/kind-e2e.sh            # create the cluster, build images, install, run the demo job
#   KEEP=1 bash scripts/kind-e2e.sh     # keep the cluster afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-flexllm}
NS=${NS:-flexllm}
TAG=${TAG:-e2e}
HELM=${HELM:-$(command -v helm || echo .cache/bin/helm)}
DEVICE_PLUGIN=${DEVICE_PLUGIN:-https://raw.githubusercontent.com/NVIDIA/k8s-device-plugin/v0.17.0/deployments/static/nvidia-device-plugin.yml}

cleanup() { [[ -n "${KEEP:-}" ]] || kind delete cluster --name "$CLUSTER"; }
trap cleanup EXIT

echo "== kind cluster with the host GPUs"
cat <<KIND | kind create cluster --name "$CLUSTER" --config -
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    extraMounts:
      # with accept-nvidia-visible-devices-as-volume-mounts=true in the NVIDIA container runtime
      - hostPath: /dev/null
        containerPath: /var/run/nvidia-container-devices/all
KIND
kubectl apply -f "$DEVICE_PLUGIN"
kubectl -n kube-system rollout status daemonset/nvidia-device-plugin-daemonset --timeout=180s
kubectl wait node --all --for=jsonpath='{.status.allocatable.nvidia\.com/gpu}' --timeout=180s 2>/dev/null \
  || kubectl get nodes -o jsonpath='{.items[*].status.allocatable}'

echo "== images"
docker build -f docker/operator.Dockerfile -t "flexllm-operator:$TAG" .
docker build -f docker/worker.Dockerfile -t "flexllm-worker:$TAG" .
kind load docker-image --name "$CLUSTER" "flexllm-operator:$TAG" "flexllm-worker:$TAG"

echo "== chart (kind's local-path storage is ReadWriteOnce: one worker replica)"
"$HELM" install flexllm charts/flexllm --namespace "$NS" --create-namespace --wait \
  --set operator.image.repository=flexllm-operator --set operator.image.tag="$TAG" \
  --set operator.image.pullPolicy=Never \
  --set worker.image.repository=flexllm-worker --set worker.image.tag="$TAG" \
  --set 'adapters.accessModes={ReadWriteOnce}'

echo "== InferenceService"
kubectl -n "$NS" apply -f examples/inferenceservice.yaml
kubectl -n "$NS" patch inferenceservices.flexllm.ai smollm2 --type=merge \
  -p '{"spec": {"image": "flexllm-worker:'"$TAG"'"}}'
kubectl -n "$NS" wait inferenceservices.flexllm.ai/smollm2 --for=condition=Ready --timeout=900s
kubectl -n "$NS" get inferenceservices.flexllm.ai

echo "== FinetuneJob (co-served with a small inference load)"
kubectl -n "$NS" apply -f examples/finetunejob.yaml
kubectl -n "$NS" port-forward svc/smollm2 8000:8000 >/dev/null 2>&1 &
FORWARD=$!
trap 'kill $FORWARD 2>/dev/null || true; cleanup' EXIT
sleep 3
for _ in $(seq 1 20); do
  curl -sf localhost:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "smollm2-135m", "prompt": "What is the capital of France?", "max_tokens": 16}' >/dev/null || true
done
kubectl -n "$NS" wait finetunejobs/tiny-lora --for=jsonpath='{.status.phase}'=Succeeded --timeout=900s
kubectl -n "$NS" get finetunejobs
kubectl -n "$NS" get inferenceservices.flexllm.ai smollm2 -o jsonpath='{.status.loadedAdapters}'; echo

echo "== the fine-tuned adapter, by name"
curl -sf localhost:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "tiny-lora", "prompt": "What is the capital of France?", "max_tokens": 16}'
echo
echo "== delete cancels and cleans up"
kubectl -n "$NS" delete finetunejob tiny-lora --timeout=120s
echo "e2e passed"
