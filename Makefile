# The README's two commands. Both first make sure .venv exists and matches requirements.txt
# (it is created if missing, and reinstalled when requirements.txt is newer than .venv/.stamp).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 15
# One torch thread: on a small machine shared with anything else, two OpenMP threads spin against
# each other and run several times slower; data loading stays in the main process for the same reason.
DEMO_THREADS ?= 1

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $(STAMP)

# Main job. Until the two-stage workflow lands: FP32 pretraining of resnet20 on the built-in digits.
# --resume auto: a rerun continues (or skips) what is already done.
demo: $(STAMP)
	$(VENV)/bin/python pretrain.py --dataset digits --arch resnet20 --input-size 32 --epochs $(DEMO_EPOCHS) \
		--batch-size 64 --lr 0.1 --workers 0 --threads $(DEMO_THREADS) --output-dir $(DEMO_DIR)/pretrain_fp32 \
		--resume auto

test: $(STAMP)
	$(VENV)/bin/python -m pytest
