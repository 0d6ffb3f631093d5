"""--train-noise: noise-aware finetuning (finetune.py) and QAT (pretrain.py) on noisy cell slices run,
report the test accuracy with and without the noise, and resume after a real SIGKILL exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import pretrain
from tiny_fp32 import DATA, fp32  # noqa: F401  (fp32: the module's start checkpoint fixture)
from lib.training import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("eager_single_thread")


def _argv(fp32: Path, out: Path) -> list[str]:
    return DATA + ["--policy", str(out.parent / "policy.json"), "--init", str(fp32), "--epochs", "2", "--lr", "0.01",
                   "--max-batches", "4", "--train-noise", "rram", "--no-export", "--no-tensorboard",
                   "--output-dir", str(out)]


def test_noise_aware_finetuning_runs_reports_both_accuracies_and_resumes_exactly(fp32, tmp_path):
    (tmp_path / "policy.json").write_text(json.dumps({"layers": [
        {"w_bit": 8, "a_bit": 8}, {"w_bit": 4, "a_bit": 4}, {"w_bit": 4, "a_bit": 4}, {"w_bit": 8, "a_bit": 8}]}))
    whole = tmp_path / "whole"
    assert finetune.main(_argv(fp32, whole)) == 0
    report = json.loads((whole / "report.json").read_text())["accuracy"]
    assert report["train_noise"] == "rram" and report["test_noise"] == "ideal"
    assert report["noisy_test_top1"] is not None
    state = load_checkpoint(whole / "checkpoint.pth.tar")
    assert state["args"]["train_noise"]["preset"] == "rram"

    killed = tmp_path / "killed"
    env = {**os.environ, "CIM_AQ_COMPILE": "0", "OMP_NUM_THREADS": "1", "CIM_AQ_KILL_AT": "1:checkpoint"}
    crashed = subprocess.run([sys.executable, "finetune.py", *_argv(fp32, killed)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert finetune.main(_argv(fp32, killed) + ["--resume", "auto"]) == 0
    a, b = load_checkpoint(whole / "checkpoint.pth.tar"), load_checkpoint(killed / "checkpoint.pth.tar")
    assert a["history"] == b["history"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_a_bad_train_noise_is_refused_before_training(fp32, tmp_path, capsys):
    (tmp_path / "policy.json").write_text(json.dumps({"layers": [{"w_bit": 8, "a_bit": 8}] * 4}))
    argv = _argv(fp32, tmp_path / "run")
    argv[argv.index("rram")] = "flash"
    assert finetune.main(argv) == 2
    assert "flash" in capsys.readouterr().err and not (tmp_path / "run").exists()
    argv[argv.index("flash")] = "--no-progress"  # --train-noise without a value: the hardware YAML's, none there
    assert finetune.main(argv) == 2
    assert "no active `noise` section" in capsys.readouterr().err
    assert pretrain.main(DATA + ["--arch", "tiny_cnn", "--epochs", "1", "--train-noise", "pcm",
                                 "--output-dir", str(tmp_path / "fp32")]) == 2
    assert "--quant uniform" in capsys.readouterr().err


def test_noise_aware_qat_runs_under_the_hardware_yaml_noise(fp32, tmp_path):
    hw = tmp_path / "hw.yaml"
    hw.write_text("cell_bits: 2\ninput_mode: multi-bit\nnoise: {prog: 0.05, stuck_off: 0.01}\n")
    out = tmp_path / "qat"
    assert pretrain.main(DATA + ["--arch", "tiny_cnn", "--epochs", "1", "--max-batches", "3", "--quant", "uniform",
                                 "--w-bit", "4", "--a-bit", "4", "--hardware", str(hw), "--init", str(fp32),
                                 "--train-noise", "--no-tensorboard", "--output-dir", str(out)]) == 0
    saved = load_checkpoint(out / "checkpoint.pth.tar")["args"]["train_noise"]
    assert (saved["prog"], saved["stuck_off"]) == (0.05, 0.01)
