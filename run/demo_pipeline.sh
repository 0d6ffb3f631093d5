#!/usr/bin/env bash
# The demo job (`make demo`): every stage that exists today, on the built-in digits dataset.
#   1. FP32 pretraining of ResNet-20 (32x32)
#   2. uniform INT8 QAT on CIM layers (the search's starting point)
#   3. a mixed-precision policy: 4-bit weights/inputs, first and last layer at 8 bit
#   4. mixed-precision finetuning, ONNX QCDQ export checked in onnxruntime, report.json
# Reruns skip or continue finished stages (--resume auto). Settings come from the environment:
#   DEMO_DIR (runs/demo)  HARDWARE (run/hardware/default.yaml)  PYTHON (.venv/bin/python)
#   FP32_EPOCHS (15)  INT8_EPOCHS (3)  FT_EPOCHS (3)  THREADS (1)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-runs/demo}
HARDWARE=${HARDWARE:-run/hardware/default.yaml}
FP32_EPOCHS=${FP32_EPOCHS:-15}
INT8_EPOCHS=${INT8_EPOCHS:-3}
FT_EPOCHS=${FT_EPOCHS:-3}
THREADS=${THREADS:-1}
COMMON=(--dataset digits --input-size 32 --batch-size 64 --workers 0 --threads "$THREADS" --no-progress --resume auto)

echo "== 1/4 FP32 pretraining -> $DEMO_DIR/pretrain_fp32"
"$PYTHON" pretrain.py "${COMMON[@]}" --arch resnet20 --epochs "$FP32_EPOCHS" --lr 0.1 \
    --output-dir "$DEMO_DIR/pretrain_fp32"

echo "== 2/4 uniform INT8 QAT on $HARDWARE -> $DEMO_DIR/pretrain_int8"
"$PYTHON" pretrain.py "${COMMON[@]}" --arch resnet20 --epochs "$INT8_EPOCHS" --lr 0.01 \
    --quant uniform --w-bit 8 --a-bit 8 --hardware "$HARDWARE" \
    --init "$DEMO_DIR/pretrain_fp32/model_best.pth.tar" --output-dir "$DEMO_DIR/pretrain_int8"

echo "== 3/4 policy -> $DEMO_DIR/policy/resnet20_w4a4_ends8.{npy,json}"
"$PYTHON" -m lib.make_policy --arch resnet20 --num-classes 10 --input-size 32 --w-bit 4 --a-bit 4 \
    --first-last 8 8 --output "$DEMO_DIR/policy/resnet20_w4a4_ends8"

echo "== 4/4 mixed-precision finetuning + ONNX export -> $DEMO_DIR/finetune"
"$PYTHON" finetune.py "${COMMON[@]}" --policy "$DEMO_DIR/policy/resnet20_w4a4_ends8.json" \
    --hardware "$HARDWARE" --init "$DEMO_DIR/pretrain_int8/model_best.pth.tar" --epochs "$FT_EPOCHS" --lr 0.005 \
    --output-dir "$DEMO_DIR/finetune"

echo "== done: $DEMO_DIR/finetune/report.json, $DEMO_DIR/finetune/model.onnx"
