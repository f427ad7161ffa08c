#!/usr/bin/env bash
# Installs FlexLLM with its test tools, then runs lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
python3 -m ruff check .
set +e
python3 -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing loudly" >&2
  exit 1
fi
exit $rc
