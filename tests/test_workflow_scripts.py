"""The CIM-AQ-compatible stage scripts: --help, CIM-AQ's positional arguments, clear refusals."""
from __future__ import annotations

import os
import subprocess

import pytest

from workflow_support import REPO

SCRIPTS = ("run_fp32_pretraining.sh", "run_int8_pretraining.sh", "run_rl_quantize.sh", "run_mp_finetuning.sh",
           "run_full_workflow.sh", "run_crossbar_sweep.sh")


def bash(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "run" / script), *args], capture_output=True, text=True,
                          env={**os.environ, "CIM_AQ_COMPILE": "0", **env})


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = bash(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_fp32_script_takes_cim_aq_positional_arguments(tmp_path):
    """fp32_model dataset dataset_root epochs suffix lr wandb project gpu batch workers, CIM-AQ's order."""
    # The digits root is the session's cache: an empty root would take CIM-AQ's default (data/imagenet100,
    # inside the repository), as `${3:-...}` does in CIM-AQ's scripts.
    result = bash("run_fp32_pretraining.sh", "custom_tiny_cnn", "digits-small", os.environ["CIM_AQ_DATA_CACHE"], "1",
                  "small", "0.05", "false", "p", "", "64", "0", RUNS_DIR=str(tmp_path), INPUT_SIZE="16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "custom_tiny_cnn_pretrained_small" / "model_best.pth.tar").is_file()


def test_unknown_names_and_missing_strategy_are_refused():
    result = bash("run_int8_pretraining.sh", "qresnet99")
    assert result.returncode == 2 and "unknown model 'qresnet99'" in result.stderr
    result = bash("run_mp_finetuning.sh", "qresnet18", "imagenet100", "data/imagenet100", "30")
    assert result.returncode == 2 and "strategy_file" in result.stderr
    result = bash("run_crossbar_sweep.sh")
    assert result.returncode == 2 and "checkpoint" in result.stderr
    result = bash("run_crossbar_sweep.sh", "no/such/model_best.pth.tar", "--sweep", "cell_bits=1,2")
    assert result.returncode == 2 and "no/such/model_best.pth.tar" in result.stderr
