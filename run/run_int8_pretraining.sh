#!/usr/bin/env bash
# Uniform INT8 QAT with CIM-AQ's positional arguments; a thin wrapper over pretrain.py --quant uniform.
source "$(dirname "$0")/stage_common.sh"  # $RUNS_DIR (default runs) holds checkpoints/ and save/
USAGE="usage: run/run_int8_pretraining.sh [quant_model] [fp32_model] [dataset] [dataset_root] [uniform_8bit_epochs]
       [force_first_last_layer] [dataset_suffix] [learning_rate] [wandb_enable] [wandb_project] [gpu_id]
       [batch_size] [num_workers]

CIM-AQ's INT8 stage: starts from runs/checkpoints/<fp32_model>_pretrained[_<dataset_suffix>]/model_best.pth.tar
and writes runs/checkpoints/<quant_model>_per-tensor_uniform_8bit[_<dataset_suffix>]/. Every layer is at 8 bit,
so force_first_last_layer changes nothing here (accepted for compatibility). Hardware: \$HARDWARE
(default run/hardware/cim_aq_default.yaml). \$INPUT_SIZE overrides the input side.
Defaults: qresnet18 custom_resnet18 imagenet100 data/imagenet100 10 true '' 0.001 false cim-aq-quantization '' 256 32"
show_help_if_asked "$USAGE" "$@"
QUANT_MODEL=${1:-qresnet18}; FP32_MODEL=${2:-custom_resnet18}; DATASET=${3:-imagenet100}
DATASET_ROOT=${4:-data/imagenet100}; EPOCHS=${5:-10}; SUFFIX=${7:-}; LR=${8:-0.001}
WANDB_ENABLE=${9:-false}; WANDB_PROJECT=${10:-cim-aq-quantization}; GPU_ID=${11:-}; BATCH_SIZE=${12:-256}
NUM_WORKERS=${13:-32}
gpu_env "$GPU_ID"
ARCH=$(our_model "$QUANT_MODEL")
DATA_KIND=$(our_dataset "$DATASET")
ARGS=(--arch "$ARCH" --dataset "$DATA_KIND"
      --quant uniform --w-bit 8 --a-bit 8 --hardware "${HARDWARE:-run/hardware/cim_aq_default.yaml}"
      --init "${RUNS_DIR:-runs}/checkpoints/${FP32_MODEL}_pretrained${SUFFIX:+_$SUFFIX}/model_best.pth.tar"
      --epochs "$EPOCHS" --lr "$LR" --batch-size "$BATCH_SIZE" --workers "$NUM_WORKERS" --resume auto
      --output-dir "${RUNS_DIR:-runs}/checkpoints/${QUANT_MODEL}_per-tensor_uniform_8bit${SUFFIX:+_$SUFFIX}")
if is_true "$WANDB_ENABLE"; then ARGS+=(--wandb "$WANDB_PROJECT"); fi
if [ -n "${INPUT_SIZE:-}" ]; then ARGS+=(--input-size "$INPUT_SIZE"); fi
if [ -n "$DATASET_ROOT" ]; then ARGS+=(--data-root "$DATASET_ROOT"); fi
exec "$PYTHON" pretrain.py "${ARGS[@]}"
