#!/usr/bin/env bash
# Mixed-precision finetuning with CIM-AQ's positional arguments; a thin wrapper over finetune.py.
source "$(dirname "$0")/stage_common.sh"  # $RUNS_DIR (default runs) holds checkpoints/ and save/
USAGE="usage: run/run_mp_finetuning.sh [quant_model] [dataset] [dataset_root] [finetune_epochs] [strategy_file]
       [output_suffix] [learning_rate] [uniform_model_file] [wandb_enable] [wandb_project] [gpu_id]
       [batch_size] [num_workers]

CIM-AQ's finetuning stage: the policy (strategy_file: CIM-AQ .npy with rows in layer construction order,
or our .json) applied to the INT8 checkpoint, trained, exported to ONNX and checked in onnxruntime.
Writes runs/checkpoints/<quant_model>_<output_suffix>/ (model_best.pth.tar, model.onnx, report.json).
Hardware: \$HARDWARE (default: the INT8 checkpoint's). \$INPUT_SIZE overrides the input side.
Defaults: qresnet18 imagenet100 data/imagenet100 30 (required) mixed_precision 0.0005
          runs/checkpoints/<quant_model>_per-tensor_uniform_8bit/model_best.pth.tar false cim-aq-quantization '' 256 32"
show_help_if_asked "$USAGE" "$@"
QUANT_MODEL=${1:-qresnet18}; DATASET=${2:-imagenet100}; DATASET_ROOT=${3:-data/imagenet100}; EPOCHS=${4:-30}
STRATEGY=${5:-}; SUFFIX=${6:-mixed_precision}; LR=${7:-0.0005}
UNIFORM_MODEL=${8:-${RUNS_DIR:-runs}/checkpoints/${QUANT_MODEL}_per-tensor_uniform_8bit/model_best.pth.tar}
WANDB_ENABLE=${9:-false}; WANDB_PROJECT=${10:-cim-aq-quantization}; GPU_ID=${11:-}; BATCH_SIZE=${12:-256}
NUM_WORKERS=${13:-32}
if [ -z "$STRATEGY" ]; then echo "error: strategy_file (argument 5) is required; see --help" >&2; exit 2; fi
gpu_env "$GPU_ID"
ARCH=$(our_model "$QUANT_MODEL")
DATA_KIND=$(our_dataset "$DATASET")
ARGS=(--arch "$ARCH" --dataset "$DATA_KIND"
      --policy "$STRATEGY" --init "$UNIFORM_MODEL" --epochs "$EPOCHS" --lr "$LR" --batch-size "$BATCH_SIZE"
      --workers "$NUM_WORKERS" --resume auto --output-dir "${RUNS_DIR:-runs}/checkpoints/${QUANT_MODEL}_${SUFFIX}")
if [ -n "${HARDWARE:-}" ]; then ARGS+=(--hardware "$HARDWARE"); fi
if is_true "$WANDB_ENABLE"; then ARGS+=(--wandb "$WANDB_PROJECT"); fi
if [ -n "${INPUT_SIZE:-}" ]; then ARGS+=(--input-size "$INPUT_SIZE"); fi
if [ -n "$DATASET_ROOT" ]; then ARGS+=(--data-root "$DATASET_ROOT"); fi
exec "$PYTHON" finetune.py "${ARGS[@]}"
