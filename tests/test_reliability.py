"""Never lose a user's work: real CLI processes killed with SIGKILL resume exactly; existing runs are
refused unless continued or overwritten; the best/last checkpoint pair survives a kill between its
writes; every user error exits 2 with one line naming the value, before any training or writing.

Kills are deterministic: CIM_AQ_KILL_AT=<epoch>:<point> makes the training process SIGKILL itself
(lib/training/kill_switch.py), a real kill of a real process at a chosen point.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.fileio import atomic_write_json
from lib.training import load_checkpoint
from lib.training.kill_switch import ENV_VAR

REPO = Path(__file__).resolve().parents[1]
HARDWARE = REPO / "run" / "hardware" / "cim_aq_default.yaml"
QUICK = ["--threads", "1", "--arch", "tiny_cnn", "--dataset", "digits-small", "--input-size", "16",
         "--batch-size", "32", "--workers", "0", "--no-progress", "--no-tensorboard", "--log-level", "warning",
         "--max-batches", "4", "--seed", "3"]
TINY_POLICY = [[8, 8], [4, 6], [3, 5], [6, 8]]  # tiny_cnn's four quantizable layers


def cli(script: str, *args, kill_at: str | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repository root as a user would."""
    env = {**os.environ, "CIM_AQ_COMPILE": "0"}  # eager ADC kernels: no compile time for a tiny net
    env.pop(ENV_VAR, None)
    if kill_at:
        env[ENV_VAR] = kill_at
    command = [sys.executable, *script.split(), *map(str, args)]
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


def refused(result: subprocess.CompletedProcess, *names: str) -> str:
    """The one-line `error: ...` of an exit-2 refusal, which must name every one of `names`."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes and mode: to prove a refusal changed nothing."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        else:
            assert a[key] == b[key], key


def assert_same_run(straight: Path, resumed: Path) -> None:
    """Per-epoch metrics, final weights (quantizer steps included) and optimizer state are identical."""
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        a, b = load_checkpoint(straight / name), load_checkpoint(resumed / name)
        assert a["epoch"] == b["epoch"] and a["history"] == b["history"], name
        assert_same_tensors(a["state_dict"], b["state_dict"])
        assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def kill_and_resume(tmp_path: Path, script: str, args: list, epochs: int = 3, kill_at: str = "2:checkpoint") -> dict:
    """An uninterrupted run against one SIGKILLed at `kill_at` and continued with --resume auto.

    Returns the checkpoint the killed process left behind.
    """
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert cli(script, *args, "--epochs", epochs, "--output-dir", straight).returncode == 0
    died = cli(script, *args, "--epochs", epochs, "--output-dir", interrupted, kill_at=kill_at)
    assert killed(died), died.stderr[-2000:]
    left = load_checkpoint(interrupted / "checkpoint.pth.tar")
    assert left["epoch"] == int(kill_at.split(":")[0]) < epochs
    resumed = cli(script, *args, "--epochs", epochs, "--output-dir", interrupted, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(straight, interrupted)
    return left


def learned_steps(state_dict: dict) -> dict:
    """The Brevitas learned step parameters (weight and input scaling) of a CIM model's state dict."""
    steps = {k: v for k, v in state_dict.items() if k.endswith("scaling_impl.step")}
    assert steps, sorted(state_dict)[:20]
    return steps


@pytest.fixture(scope="module")
def fp32_start(tmp_path_factory) -> Path:
    """An FP32 tiny_cnn checkpoint (one short epoch): the start of QAT."""
    out = tmp_path_factory.mktemp("fp32")
    run = cli("pretrain.py", *QUICK, "--epochs", "1", "--lr", "0.1", "--output-dir", out)
    assert run.returncode == 0, run.stderr[-2000:]
    return out / "model_best.pth.tar"


@pytest.fixture(scope="module")
def int8_start(tmp_path_factory, fp32_start) -> Path:
    """A uniform INT8 QAT checkpoint of tiny_cnn (one short epoch): the start of finetuning."""
    out = tmp_path_factory.mktemp("int8")
    run = cli("pretrain.py", *QUICK, "--epochs", "1", "--lr", "0.02", "--quant", "uniform", "--hardware", HARDWARE,
              "--init", fp32_start, "--output-dir", out)
    assert run.returncode == 0, run.stderr[-2000:]
    return out / "model_best.pth.tar"


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "mixed.npy"
    np.save(path, np.array(TINY_POLICY))
    return path


# ------------------------------------------------------------------ exact resume after SIGKILL
def test_fp32_pretraining_killed_and_resumed_is_exact(tmp_path):
    kill_and_resume(tmp_path, "pretrain.py", QUICK + ["--lr", "0.1"])


def test_int8_qat_killed_and_resumed_is_exact_and_its_steps_keep_training(tmp_path, fp32_start):
    args = QUICK + ["--lr", "0.02", "--quant", "uniform", "--init", fp32_start]
    left = kill_and_resume(tmp_path, "pretrain.py", args)
    final = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pth.tar")
    before, after = learned_steps(left["state_dict"]), learned_steps(final["state_dict"])
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the resumed epoch trained the steps


def test_mixed_precision_finetuning_killed_and_resumed_is_exact(tmp_path, int8_start, policy_file):
    args = QUICK + ["--lr", "0.02", "--policy", policy_file, "--init", int8_start, "--no-export"]
    left = kill_and_resume(tmp_path, "finetune.py", args)
    final = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pth.tar")
    before, after = learned_steps(left["state_dict"]), learned_steps(final["state_dict"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
