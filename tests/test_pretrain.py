"""pretrain.py and the training library: learning, exact resume, evaluation, checkpoint errors, tracking."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
from lib.training import (CheckpointError, OptimConfig, Tracker, fit, load_checkpoint, make_checkpoint,
                          prepare_training, save_checkpoint)
from lib.training.tracking import network_reachable
from models import create_model

REPO = Path(__file__).resolve().parents[1]
# digits-small (500 train / 200 val) at 8x8 with tiny_cnn: ten 50-image batches per epoch.
QUICK = ["--dataset", "digits-small", "--arch", "tiny_cnn", "--input-size", "8", "--batch-size", "50",
         "--workers", "0", "--lr", "0.1", "--seed", "1", "--no-progress", "--no-tensorboard"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tensors are tiny: one thread is faster than two fighting over a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(argv: list[str]) -> int:
    return pretrain.main([str(a) for a in argv])


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_training_learns_and_evaluate_reports_the_same_accuracy(tmp_path, digits_cache):
    out = tmp_path / "run"
    cmd = [sys.executable, "pretrain.py", "--dataset", "digits", "--arch", "tiny_cnn", "--input-size", "8",
           "--batch-size", "32", "--workers", "0", "--epochs", "3", "--lr", "0.1", "--threads", "1",
           "--no-progress", "--output-dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CIM_AQ_DATA_CACHE": str(digits_cache)})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["best_acc1"] > 30.0  # chance is 10%
    assert summary["history"][-1]["train"]["loss"] < summary["history"][0]["train"]["loss"]
    assert (out / "checkpoint.pth.tar").is_file() and (out / "model_best.pth.tar").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    assert json.loads(done.stdout.strip().splitlines()[-1])["best_acc1"] == summary["best_acc1"]

    assert _run(["--evaluate", "--resume", out / "model_best.pth.tar", "--workers", "0", "--no-progress"]) == 0
    evaluated = json.loads((out / "eval_metrics.json").read_text())
    assert evaluated["val"]["top1"] == pytest.approx(summary["best_acc1"])
    assert evaluated["spec"]["arch"] == "tiny_cnn" and evaluated["spec"]["input_size"] == 8


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(QUICK + ["--epochs", "2", "--output-dir", straight]) == 0
    assert _run(QUICK + ["--epochs", "1", "--output-dir", split]) == 0
    after_one = load_checkpoint(split / "checkpoint.pth.tar")
    assert after_one["epoch"] == 1 and after_one["args"]["arch"] == "tiny_cnn"
    # --resume needs no model flags (they come from the checkpoint) and continues in the checkpoint's folder
    assert _run(["--resume", split / "checkpoint.pth.tar", "--epochs", "2", "--workers", "0",
                 "--batch-size", "50", "--lr", "0.1", "--seed", "1", "--no-progress", "--no-tensorboard"]) == 0
    a, b = load_checkpoint(straight / "checkpoint.pth.tar"), load_checkpoint(split / "checkpoint.pth.tar")
    assert b["epoch"] == 2 and b["history"][0] == after_one["history"][0]
    assert _states_equal(a["state_dict"], b["state_dict"])
    assert a["history"] == b["history"] and a["best_acc1"] == b["best_acc1"]
    assert _states_equal(a["optimizer"]["state"][0], b["optimizer"]["state"][0])


def test_fit_resume_restores_epoch_optimizer_and_scheduler(tmp_path):
    from lib.data import build_loaders

    data = build_loaders("digits-small", input_size=8, batch_size=100, workers=0)
    cfg = OptimConfig(epochs=2, lr=0.2)
    model = create_model("tiny_cnn", 10)
    first = fit(model, data.train, data.val, cfg, tmp_path, args={"arch": "tiny_cnn"}, progress=False,
                max_batches=2)
    assert first.epochs_run == 2 and first.best_checkpoint.is_file()
    saved = load_checkpoint(first.checkpoint)

    fresh = create_model("tiny_cnn", 10)
    again = fit(fresh, data.train, data.val, cfg, tmp_path / "again", resume=first.checkpoint, progress=False)
    assert again.epochs_run == 0 and again.best_acc1 == saved["best_acc1"]
    assert _states_equal(fresh.state_dict(), saved["state_dict"])
    restored = prepare_training(create_model("tiny_cnn", 10), cfg, saved, first.checkpoint)
    optimizer = restored.optimizer
    assert restored.start_epoch == 2 and restored.history == saved["history"]
    for index, buffers in saved["optimizer"]["state"].items():
        assert torch.equal(optimizer.state_dict()["state"][index]["momentum_buffer"], buffers["momentum_buffer"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(saved["optimizer"]["param_groups"][0]["lr"])


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path, capsys):
    good = save_checkpoint(make_checkpoint(epoch=1, state_dict=create_model("tiny_cnn", 10).state_dict(),
                                           args={"arch": "tiny_cnn"}), tmp_path)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pth.tar"
    torch.save({"model": create_model("tiny_cnn", 10).state_dict(), "epoch": 3}, foreign)
    with pytest.raises(CheckpointError, match="not a cim-aq checkpoint"):
        load_checkpoint(foreign)

    assert _run(QUICK + ["--epochs", "1", "--resume", truncated, "--output-dir", tmp_path / "x"]) == 2
    assert f"{truncated}" in capsys.readouterr().err
    assert _run(["--evaluate", "--resume", foreign, "--workers", "0"]) == 2
    assert "not a cim-aq checkpoint" in capsys.readouterr().err


def test_resume_with_a_conflicting_model_flag_is_refused(tmp_path):
    assert _run(QUICK + ["--epochs", "1", "--max-batches", "1", "--output-dir", tmp_path]) == 0
    with pytest.raises(pretrain.PretrainError, match="--arch resnet20 conflicts"):
        pretrain.run_train(pretrain.parse_args([str(a) for a in QUICK[:2] + [
            "--arch", "resnet20", "--resume", tmp_path / "checkpoint.pth.tar", "--output-dir", tmp_path]]))


def test_uniform_qat_seam_records_and_rebuilds_the_quantized_model(tmp_path):
    fp32, qat = tmp_path / "fp32", tmp_path / "qat"
    assert _run(QUICK + ["--epochs", "1", "--output-dir", fp32]) == 0
    assert _run(QUICK + ["--epochs", "1", "--lr", "0.01", "--quant", "uniform", "--w-bit", "6", "--a-bit", "5",
                         "--hardware", REPO / "run" / "hardware" / "cim_aq_default.yaml",
                         "--init", fp32 / "checkpoint.pth.tar", "--output-dir", qat]) == 0
    state = load_checkpoint(qat / "model_best.pth.tar")
    args = state["args"]
    assert (args["quant"], args["w_bit"], args["a_bit"]) == ("uniform", 6, 5)
    assert args["hardware"].endswith("cim_aq_default.yaml") and args["hardware_config"]["rows"] == 256
    assert set(state["state_dict"]) != set(load_checkpoint(fp32 / "checkpoint.pth.tar")["state_dict"])
    # --evaluate rebuilds create_model → quantize_model → load_state_dict from the recorded args alone
    assert _run(["--evaluate", "--resume", qat / "model_best.pth.tar", "--workers", "0", "--no-progress"]) == 0
    evaluated = json.loads((qat / "eval_metrics.json").read_text())
    assert evaluated["val"]["top1"] == pytest.approx(state["best_acc1"])


def test_wandb_logs_offline_without_blocking(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on: unreachable at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not network_reachable(("127.0.0.1", port), timeout=1.0)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path, tensorboard=True, wandb_project="cim-aq-test", run_name="t", config={"lr": 0.1})
    assert tracker.wandb_run is not None
    tracker.log({"val/top1": 42.0}, step=1)
    tracker.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
