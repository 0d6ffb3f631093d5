# Shared by the CIM-AQ-compatible stage scripts (sourced, not run): repository root, interpreter,
# --help, true/false arguments and CIM-AQ names mapped onto ours.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-"$REPO_ROOT/.venv/bin/python"}
[ -x "$PYTHON" ] || PYTHON=python3
cd "$REPO_ROOT"

# show_help_if_asked "$usage" "$@": print the usage block and exit 0 on -h/--help.
show_help_if_asked() {
  local usage=$1; shift
  for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then printf '%s\n' "$usage"; exit 0; fi
  done
}

# is_true VALUE: CIM-AQ's spelling of booleans (true/True/1).
is_true() { [ "$1" = "true" ] || [ "$1" = "True" ] || [ "$1" = "1" ]; }

our_model() { "$PYTHON" -m lib.workflow.names --model "$1"; }
our_dataset() { "$PYTHON" -m lib.workflow.names --dataset "$1"; }

# gpu_env GPU_ID: CUDA_VISIBLE_DEVICES as CIM-AQ sets it (a no-op on CPU-only machines).
gpu_env() { if [ -n "$1" ]; then export CUDA_VISIBLE_DEVICES="$1"; fi; }
