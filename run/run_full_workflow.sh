#!/usr/bin/env bash
# The two-stage workflow of one experiment YAML: run/run_full_workflow.sh CONFIG.yaml
# (a thin wrapper over `python -m lib.workflow`; --help lists its options).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-"$REPO_ROOT/.venv/bin/python"}
[ -x "$PYTHON" ] || PYTHON=python3
cd "$REPO_ROOT"
exec "$PYTHON" -m lib.workflow "$@"
