#!/usr/bin/env bash
# FP32 pretraining with CIM-AQ's positional arguments; a thin wrapper over pretrain.py.
source "$(dirname "$0")/stage_common.sh"  # $RUNS_DIR (default runs) holds checkpoints/ and save/
USAGE="usage: run/run_fp32_pretraining.sh [fp32_model] [dataset] [dataset_root] [fp32_finetune_epochs]
       [dataset_suffix] [learning_rate] [wandb_enable] [wandb_project] [gpu_id] [batch_size] [num_workers]

CIM-AQ's FP32 stage. Model and dataset names may be CIM-AQ's (custom_resnet18, imagenet100, ...)
or ours (resnet20, digits, ...). Writes runs/checkpoints/<fp32_model>_pretrained[_<dataset_suffix>]/
(model_best.pth.tar, metrics.json); a rerun continues it (--resume auto). Weights start from
\$PRETRAINED (a local file) when set: nothing is downloaded. \$INPUT_SIZE overrides the input side.
Defaults: custom_resnet18 imagenet100 data/imagenet100 5 '' 0.0005 false cim-aq-quantization '' 256 32"
show_help_if_asked "$USAGE" "$@"
FP32_MODEL=${1:-custom_resnet18}; DATASET=${2:-imagenet100}; DATASET_ROOT=${3:-data/imagenet100}
EPOCHS=${4:-5}; SUFFIX=${5:-}; LR=${6:-0.0005}; WANDB_ENABLE=${7:-false}; WANDB_PROJECT=${8:-cim-aq-quantization}
GPU_ID=${9:-}; BATCH_SIZE=${10:-256}; NUM_WORKERS=${11:-32}
gpu_env "$GPU_ID"
ARCH=$(our_model "$FP32_MODEL")
DATA_KIND=$(our_dataset "$DATASET")
ARGS=(--arch "$ARCH" --dataset "$DATA_KIND"
      --epochs "$EPOCHS" --lr "$LR" --batch-size "$BATCH_SIZE" --workers "$NUM_WORKERS" --resume auto
      --output-dir "${RUNS_DIR:-runs}/checkpoints/${FP32_MODEL}_pretrained${SUFFIX:+_$SUFFIX}")
if is_true "$WANDB_ENABLE"; then ARGS+=(--wandb "$WANDB_PROJECT"); fi
if [ -n "${PRETRAINED:-}" ]; then ARGS+=(--pretrained "$PRETRAINED"); fi
if [ -n "${INPUT_SIZE:-}" ]; then ARGS+=(--input-size "$INPUT_SIZE"); fi
if [ -n "$DATASET_ROOT" ]; then ARGS+=(--data-root "$DATASET_ROOT"); fi
exec "$PYTHON" pretrain.py "${ARGS[@]}"
