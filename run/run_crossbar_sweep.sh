#!/usr/bin/env bash
# Post-training crossbar sweep of a checkpoint; a thin wrapper over python -m lib.crossbar_eval.
source "$(dirname "$0")/stage_common.sh"
USAGE="usage: run/run_crossbar_sweep.sh checkpoint [output_dir] [flags of python -m lib.crossbar_eval ...]

Scores the checkpoint on the crossbar at every point of a sweep (docs/crossbar-eval.md) and writes
sweep.json, sweep.csv, sweep.md and sweep.png into output_dir (default runs/sweeps/<checkpoint folder>).
Continues a killed or extended sweep there (--resume auto). Without a --sweep flag it sweeps
\$SWEEP (default: cell_bits=1,2,4 adc_bits=3:8); \$NOISE (e.g. 'prog=0,0.02,0.05') and \$REPEATS
(default 5) add device noise. An FP32 checkpoint needs --w-bit/--a-bit or --policy."
show_help_if_asked "$USAGE" "$@"
CHECKPOINT=${1:-}
if [ -z "$CHECKPOINT" ]; then echo "error: checkpoint (argument 1) is required; see --help" >&2; exit 2; fi
shift
OUTPUT_DIR="${RUNS_DIR:-runs}/sweeps/$(basename "$(dirname "$CHECKPOINT")")"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUTPUT_DIR=$1; shift; fi
ARGS=(--checkpoint "$CHECKPOINT" --output-dir "$OUTPUT_DIR" --resume auto)
case " $* " in *" --sweep "*) ;; *) read -r -a AXES <<< "${SWEEP:-cell_bits=1,2,4 adc_bits=3:8}"; ARGS+=(--sweep "${AXES[@]}");; esac
if [ -n "${NOISE:-}" ]; then read -r -a KINDS <<< "$NOISE"; ARGS+=(--noise "${KINDS[@]}" --repeats "${REPEATS:-5}"); fi
exec "$PYTHON" -m lib.crossbar_eval "${ARGS[@]}" "$@"
