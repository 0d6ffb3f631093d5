# The README's two commands. Both first make sure .venv exists and matches requirements.txt
# (it is created if missing, and reinstalled when requirements.txt is newer than .venv/.stamp).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.stamp
DEMO_CONFIG ?= run/configs/demo.yaml

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $(STAMP)

# Main job: the two-stage workflow on the built-in digits (run/configs/demo.yaml): stage 1 searches a
# mixed-precision policy on digits-small, stage 2 trains on digits and finetunes to it; ONNX export
# checked in onnxruntime; results.md/.json and plots in runs/workflow/demo_resnet20_default/.
# A rerun skips finished steps and resumes an interrupted one.
demo: $(STAMP)
	PYTHON=$(VENV)/bin/python bash run/run_full_workflow.sh $(DEMO_CONFIG)

test: $(STAMP)
	$(VENV)/bin/python -m pytest
