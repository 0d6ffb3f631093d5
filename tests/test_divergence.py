"""Never keep a broken model: NaN/inf stops training at the step that made it, is never written
to or read from a checkpoint, never becomes integer codes, and a diverging search episode is
scored and the search goes on. Real layers, real files, real CLI processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib.cim import CIMLayerMixin, HardwareConfig, calibrate, quantize_model
from lib.export import ExportError, export_model
from lib.finite import NonFiniteError, first_nonfinite, require_finite
from lib.search import DIVERGE_ENV, KILL_ENV
from lib.training import (CheckpointError, DivergedError, OptimConfig, build_optimizer, load_checkpoint,
                          make_checkpoint, save_checkpoint, train_one_epoch)
from models import create_model
from search_support import make_int8_checkpoint

REPO = Path(__file__).resolve().parent.parent
HARDWARE = REPO / "run" / "hardware" / "cim_aq_default.yaml"
FAST_ENV = {"CIM_AQ_COMPILE": "0"}  # eager ADC kernels: no compile time for short runs


def run(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **FAST_ENV, **(env or {})}
    for hook in (KILL_ENV, DIVERGE_ENV):
        if hook not in (env or {}):
            environment.pop(hook, None)
    return subprocess.run([sys.executable, *script.split(), *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return first_nonfinite(_tensors(state)) is None


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the check itself
def test_first_nonfinite_names_the_first_bad_tensor_and_skips_what_cannot_be_bad():
    good, huge = torch.ones(5), torch.full((3,), 1e30)  # a norm of `huge` overflows: still finite values
    nan, inf = torch.tensor([1.0, math.nan]), torch.tensor([-math.inf])
    half = torch.tensor([300.0, 300.0], dtype=torch.float16)  # its norm would overflow float16
    assert first_nonfinite([("a", good), ("b", huge), ("g", None), ("i", torch.arange(3)), ("h", half)]) is None
    assert first_nonfinite([("a", good), ("inf", inf), ("nan", nan)]) == "inf"
    with pytest.raises(NonFiniteError, match=r"checkpoint x: tensor 'state_dict.w' holds 1 NaN of 2 values"):
        require_finite({"state_dict": {"v": good, "w": nan}, "epoch": 3}, "checkpoint x")


# ------------------------------------------------------------------ training
def tiny_cim_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10)
    quantize_model(model, (8, 8), HardwareConfig.from_yaml(HARDWARE), input_size=16,
                   calibration_data=[torch.randn(8, 3, 16, 16)])
    return model


def batches(count: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]


def test_a_nan_gradient_stops_before_the_optimizer_step_naming_the_parameter(eager_single_thread):
    model = tiny_cim_model()
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 4)
    before = param.detach().clone()
    param.register_hook(lambda grad: grad * math.nan)  # the loss stays finite; this one gradient does not
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, epochs=1))
    with pytest.raises(DivergedError) as caught:
        train_one_epoch(model, batches(), nn.CrossEntropyLoss(), optimizer, progress=False)
    assert (caught.value.kind, caught.value.tensor, caught.value.step) == ("gradient", name, 1)
    assert torch.equal(param.detach(), before)  # the step was never taken
    assert first_nonfinite(model.named_parameters()) is None


def test_an_update_that_makes_a_parameter_infinite_stops_at_that_batch(eager_single_thread):
    model = tiny_cim_model()
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, epochs=1))
    for group in optimizer.param_groups:
        group["lr"] = math.inf
    with pytest.raises(DivergedError) as caught:
        train_one_epoch(model, batches(), nn.CrossEntropyLoss(), optimizer, progress=False)
    assert caught.value.kind == "parameter" and caught.value.step == 1 and caught.value.tensor


def test_a_state_with_a_nan_is_never_written(tmp_path):
    state = make_checkpoint(epoch=1, state_dict={"w": torch.tensor([1.0, math.nan])}, args={})
    with pytest.raises(NonFiniteError, match="'state_dict.w'"):
        save_checkpoint(state, tmp_path, is_best=True)
    assert list(tmp_path.iterdir()) == []


def test_calibration_fits_steps_to_the_batch_statistics_training_will_use(eager_single_thread):
    """A badly trained FP32 start: BatchNorm's running statistics are far from its batch ones. Steps
    fitted to the running ones round whole channels to zero in training, whose BatchNorm backward
    then multiplies gradients by 1/sqrt(eps) per layer; fitted to the batch ones they do not."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10)
    for module in model.modules():  # what two steps at lr 0.1 leave: running statistics of another scale
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.fill_(0.01)
    data = [(torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    norms = {}
    for mode in ("running", "batch"):
        cim = quantize_model(create_model("resnet20", 10), (8, 8), HardwareConfig.from_yaml(HARDWARE),
                             input_size=32)
        cim.load_state_dict(model.state_dict(), strict=False)
        calibrate(cim, data, max_batches=2, batch_norm=mode)
        assert all(float(bn.running_var.max()) == pytest.approx(0.01) for bn in cim.modules()
                   if isinstance(bn, nn.BatchNorm2d))  # statistics untouched either way
        cim.train()
        nn.functional.cross_entropy(cim(data[0][0]), data[0][1]).backward()
        norms[mode] = max(float(p.grad.abs().max()) for p in cim.parameters() if p.grad is not None)
    assert norms["batch"] < 100 < norms["running"], norms
    with pytest.raises(ValueError, match="batch_norm='train'"):
        calibrate(model, data, batch_norm="train")


# ------------------------------------------------------------------ integer paths
def test_non_finite_weights_or_inputs_never_become_integer_codes(eager_single_thread):
    model = tiny_cim_model().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
        bad_input = x.clone()
        bad_input[0, 0, 0, 0] = math.nan
        try:  # integer products refuse it; float products carry the NaN to the output
            assert torch.isnan(model(bad_input)).any()
        except NonFiniteError as err:
            assert "to convert to integer codes" in str(err)
        layer = next(m for m in model.modules() if isinstance(m, CIMLayerMixin))
        layer.weight[0, 0, 0, 0] = math.nan
        with pytest.raises(NonFiniteError, match="integer weights"):
            model(x)  # the eval cache rebuilds the crossbar form from the changed weight
        with pytest.raises(ExportError, match="weight"):
            export_model(model, Path("never.onnx"), x)
    assert not Path("never.onnx").exists()


# ------------------------------------------------------------------ start checkpoints
@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    """A real INT8 checkpoint of tiny_cnn with one NaN written into it by hand (not by our writer)."""
    folder = tmp_path_factory.mktemp("nan")
    good = make_int8_checkpoint(folder / "good")
    state = torch.load(good, map_location="cpu", weights_only=True)
    name = next(k for k in state["state_dict"] if k.endswith("weight"))
    state["state_dict"][name][0] = math.nan
    path = folder / "broken.pth.tar"
    torch.save(state, path)
    return path, name


def test_a_checkpoint_holding_a_nan_is_refused_by_every_stage_at_start_up(nan_checkpoint, tmp_path):
    path, name = nan_checkpoint
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path)
    policy = tmp_path / "policy.npy"
    np.save(policy, np.array([[8, 8], [4, 6], [3, 5], [6, 8]]))  # tiny_cnn's four layers
    line = error_line(run("finetune.py", "--init", path, "--policy", policy, "--epochs", "1",
                          "--output-dir", tmp_path / "ft", "--no-progress"))
    assert name in line and "NaN" in line
    line = error_line(run("rl_quantize.py", "--init", path, "--output-dir", tmp_path / "rl", "--episodes", "1"))
    assert name in line and "NaN" in line
    line = error_line(run("-m lib.export", "--checkpoint", path, "--output", tmp_path / "m.onnx"))
    assert name in line and "NaN" in line
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in ("ft", "rl"))


# ------------------------------------------------------------------ the search
SEARCH = ["--episodes", "4", "--warmup", "1", "--finetune-steps", "2", "--batch-size", "16", "--search-holdout", "32",
          "--search-train-size", "128", "--top-k", "2", "--top-k-finetune-steps", "2", "--calibration-batches", "1",
          "--hidden1", "16", "--hidden2", "16", "--bsize", "8", "--threads", "1", "--no-progress", "--device", "cpu",
          "--seed", "3", "--no-tensorboard"]


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory) -> Path:
    return make_int8_checkpoint(tmp_path_factory.mktemp("int8_tiny"))


def test_a_diverging_episode_is_scored_and_the_search_goes_on_and_resumes_across_it(int8_tiny, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    diverge = {DIVERGE_ENV: "2"}  # episode 2's policy is finetuned at an infinite learning rate
    done = run("rl_quantize.py", "--init", int8_tiny, "--output-dir", straight, *SEARCH, env=diverge)
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(straight)
    assert [r["status"] for r in log] == ["ok", "diverged", "ok", "ok"]
    bad = log[1]
    assert bad["accuracy"] is None and not bad["feasible"] and bad["diverged"]["batch"] == 1
    assert bad["diverged"]["kind"] == "parameter" and bad["diverged"]["tensor"]
    assert bad["reward"] < min(r["reward"] for r in log if r["status"] == "ok")
    assert "diverged" in done.stderr  # logged as a warning
    best = json.loads((straight / "best_policy.json").read_text())
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["best"]["episode"] != 1 and summary["best"]["accuracy"] is not None
    assert best["accuracy"] == summary["best"]["accuracy"] and best["episode"] != 1
    assert all_finite(straight / "search_state.pth")

    died = run("rl_quantize.py", "--init", int8_tiny, "--output-dir", killed, *SEARCH, env={**diverge, KILL_ENV: "3"})
    assert died.returncode == -9, died.stderr[-3000:]
    assert [r["status"] for r in read_log(killed)] == ["ok", "diverged", "ok"]
    resumed = run("rl_quantize.py", "--init", int8_tiny, "--output-dir", killed, *SEARCH, "--resume", "auto",
                  env=diverge)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = read_log(killed), read_log(straight)
    assert [r["policy"] for r in got] == [r["policy"] for r in want]
    assert [r["status"] for r in got] == [r["status"] for r in want]
    assert [r["accuracy"] for r in got] == pytest.approx([r["accuracy"] for r in want])


def test_a_start_that_diverges_at_once_is_an_error_naming_the_checkpoint(int8_tiny, tmp_path):
    line = error_line(run("rl_quantize.py", "--init", int8_tiny, "--output-dir", tmp_path / "s", *SEARCH,
                          "--finetune-lr", "inf"))
    assert "INT8 baseline" in line and str(int8_tiny) in line and "--finetune-lr" in line


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_from_a_badly_trained_start_give_a_finite_int8_model_and_a_full_search(arch, tmp_path):
    """A user's first try: 2 FP32 batches at lr 0.1, 2 INT8 batches, then a short search."""
    data = ["--arch", arch, "--dataset", "digits-small", "--input-size", "32", "--batch-size", "16", "--threads", "1",
            "--no-progress", "--workers", "0"]
    fp32, int8, search = tmp_path / "fp32", tmp_path / "int8", tmp_path / "search"
    done = run("pretrain.py", *data, "--epochs", "1", "--max-batches", "2", "--no-tensorboard", "--output-dir", fp32)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("pretrain.py", *data, "--epochs", "1", "--max-batches", "2", "--no-tensorboard", "--quant", "uniform",
               "--w-bit", "8", "--a-bit", "8", "--hardware", HARDWARE, "--init", fp32 / "model_best.pth.tar",
               "--output-dir", int8)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model_best.pth.tar", "checkpoint.pth.tar"):
        assert all_finite(int8 / name), name
    done = run("rl_quantize.py", *data, "--init", int8 / "model_best.pth.tar", "--hardware", HARDWARE, "--min-bit",
               "3", "--max-bit", "7", "--episodes", "3", "--warmup", "1", "--finetune-steps", "1", "--top-k", "1",
               "--top-k-finetune-steps", "2", "--no-tensorboard", "--output-dir", search)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_log(search)) == 3 and (search / "best_policy.npy").is_file()
