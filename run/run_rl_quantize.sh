#!/usr/bin/env bash
# The mixed-precision search with CIM-AQ's positional arguments; a thin wrapper over rl_quantize.py.
source "$(dirname "$0")/stage_common.sh"  # $RUNS_DIR (default runs) holds checkpoints/ and save/
USAGE="usage: run/run_rl_quantize.sh [quant_model] [dataset] [dataset_root] [max_accuracy_drop] [min_bit] [max_bit]
       [train_episodes] [search_finetune_epochs] [force_first_last_layer] [consider_cell_resolution]
       [output_suffix] [finetune_lr] [uniform_model_file] [wandb_enable] [wandb_project] [gpu_id]
       [batch_size] [num_workers] [amp_enable]

CIM-AQ's search stage from a uniform INT8 checkpoint; writes runs/save/<quant_model>_<dataset>_<output_suffix>_from_8bit/
(best_policy.npy in CIM-AQ's format, best_policy.json, episodes.jsonl, summary.json); a rerun continues it.
The values CIM-AQ's script hard-codes are used too: 20000 training / 10000 held-out search images, 30 warm-up
episodes, init_delta 0.6, delta_decay 0.997, actor/critic learning rates 5e-5/1e-3, batch 64, replay 128.
amp_enable is accepted and ignored (float32). Hardware: \$HARDWARE (default run/hardware/cim_aq_default.yaml).
Defaults: qresnet18 imagenet100 data/imagenet100 1.0 1 8 600 3 true false accdrop<drop>bit<min><max> 0.001
          runs/checkpoints/<quant_model>_per-tensor_uniform_8bit/model_best.pth.tar false cim-aq-quantization '' 128 32 true"
show_help_if_asked "$USAGE" "$@"
QUANT_MODEL=${1:-qresnet18}; DATASET=${2:-imagenet100}; DATASET_ROOT=${3:-data/imagenet100}
MAX_ACCURACY_DROP=${4:-1.0}; MIN_BIT=${5:-1}; MAX_BIT=${6:-8}; EPISODES=${7:-600}; SEARCH_EPOCHS=${8:-3}
FORCE_FIRST_LAST=${9:-true}; CELL_RESOLUTION=${10:-false}; SUFFIX=${11:-accdrop${MAX_ACCURACY_DROP}bit${MIN_BIT}${MAX_BIT}}
FINETUNE_LR=${12:-0.001}
UNIFORM_MODEL=${13:-${RUNS_DIR:-runs}/checkpoints/${QUANT_MODEL}_per-tensor_uniform_8bit/model_best.pth.tar}
WANDB_ENABLE=${14:-false}; WANDB_PROJECT=${15:-cim-aq-quantization}; GPU_ID=${16:-}; BATCH_SIZE=${17:-128}
NUM_WORKERS=${18:-32}
gpu_env "$GPU_ID"
ARCH=$(our_model "$QUANT_MODEL")
DATA_KIND=$(our_dataset "$DATASET")
ARGS=(--arch "$ARCH" --dataset "$DATA_KIND"
      --init "$UNIFORM_MODEL" --hardware "${HARDWARE:-run/hardware/cim_aq_default.yaml}"
      --max-accuracy-drop "$MAX_ACCURACY_DROP" --min-bit "$MIN_BIT" --max-bit "$MAX_BIT" --episodes "$EPISODES"
      --finetune-epochs "$SEARCH_EPOCHS" --finetune-lr "$FINETUNE_LR" --search-train-size 20000
      --search-holdout 10000 --warmup 30 --init-delta 0.6 --delta-decay 0.997 --lr-actor 5e-5 --lr-critic 1e-3
      --bsize 64 --rmsize 128 --batch-size "$BATCH_SIZE" --workers "$NUM_WORKERS" --resume auto
      --output-dir "${RUNS_DIR:-runs}/save/${QUANT_MODEL}_${DATASET}_${SUFFIX}_from_8bit")
if is_true "$FORCE_FIRST_LAST"; then ARGS+=(--force-first-last 8); fi
if is_true "$CELL_RESOLUTION"; then ARGS+=(--cell-resolution-constraint); fi
if [ -n "${INPUT_SIZE:-}" ]; then ARGS+=(--input-size "$INPUT_SIZE"); fi
if [ -n "$DATASET_ROOT" ]; then ARGS+=(--data-root "$DATASET_ROOT"); fi
exec "$PYTHON" rl_quantize.py "${ARGS[@]}"
