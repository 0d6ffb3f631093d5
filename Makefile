# The README's two commands. Both first make sure .venv exists and matches requirements.txt
# (it is created if missing, and reinstalled when requirements.txt is newer than .venv/.stamp).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp
DEMO_DIR ?= runs/demo
# One torch thread: on a small machine shared with anything else, two OpenMP threads spin against
# each other and run several times slower; data loading stays in the main process for the same reason.
DEMO_THREADS ?= 1

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $(STAMP)

# Main job: run/demo_pipeline.sh on the built-in digits — FP32 pretraining, uniform INT8 QAT on CIM
# layers, a mixed-precision policy, finetuning, ONNX QCDQ export checked in onnxruntime, report.
# Reruns continue or skip finished stages (--resume auto).
demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) THREADS=$(DEMO_THREADS) PYTHON=$(VENV)/bin/python bash run/demo_pipeline.sh

test: $(STAMP)
	$(VENV)/bin/python -m pytest
