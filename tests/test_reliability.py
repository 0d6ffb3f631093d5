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

import finetune
import pretrain
from lib.export.__main__ import main as export_main
from lib.fileio import atomic_write, current_umask
from lib.cim import HardwareConfig, quantize_model
from lib.training import OptimConfig, build_optimizer, build_scheduler, load_checkpoint, make_checkpoint, \
    prepare_training
from models import create_model
from lib.training.kill_switch import ENV_VAR

REPO = Path(__file__).resolve().parents[1]
HARDWARE = REPO / "run" / "hardware" / "cim_aq_default.yaml"
QUICK = ["--threads", "1", "--arch", "tiny_cnn", "--dataset", "digits-small", "--input-size", "16",
         "--batch-size", "16", "--workers", "0", "--no-progress", "--no-tensorboard", "--log-level", "warning",
         "--max-batches", "8", "--seed", "3"]
TINY_POLICY = [[8, 8], [4, 6], [3, 5], [6, 8]]  # tiny_cnn's four quantizable layers

pytestmark = pytest.mark.usefixtures("eager_single_thread")  # in-process runs: eager ADC kernels, one thread


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


MAINS = {"pretrain.py": pretrain.main, "finetune.py": finetune.main}


def in_process(script: str, *args) -> int:
    """The CLI's main() in this process (no interpreter start-up): for the runs nobody kills."""
    return MAINS[script]([str(a) for a in args])


def kill_and_resume(tmp_path: Path, script: str, args: list, epochs: int = 3, kill_at: str = "2:checkpoint") -> dict:
    """An uninterrupted run against a process SIGKILLed at `kill_at` and continued with --resume auto.

    Returns the checkpoint the killed process left behind.
    """
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert in_process(script, *args, "--epochs", epochs, "--output-dir", straight) == 0
    died = cli(script, *args, "--epochs", epochs, "--output-dir", interrupted, kill_at=kill_at)
    assert killed(died), died.stderr[-2000:]
    left = load_checkpoint(interrupted / "checkpoint.pth.tar")
    assert left["epoch"] == int(kill_at.split(":")[0]) < epochs
    assert in_process(script, *args, "--epochs", epochs, "--output-dir", interrupted, "--resume", "auto") == 0
    assert_same_run(straight, interrupted)
    return left


def learned_steps(state_dict: dict) -> dict:
    """The Brevitas learned step parameters (weight and input scaling) of a CIM model's state dict."""
    steps = {k: v for k, v in state_dict.items() if k.endswith("scaling_impl.step")}
    assert steps, sorted(state_dict)[:20]
    return steps


@pytest.fixture(scope="module")
def module_env():
    """The eager_single_thread settings for module-scoped fixtures that train in this process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIM_AQ_COMPILE", "0")
        before = torch.get_num_threads()
        yield
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fp32_start(tmp_path_factory, module_env) -> Path:
    """An FP32 tiny_cnn checkpoint (one short epoch): the start of QAT."""
    out = tmp_path_factory.mktemp("fp32")
    assert in_process("pretrain.py", *QUICK, "--epochs", "1", "--lr", "0.1", "--output-dir", out) == 0
    return out / "model_best.pth.tar"


@pytest.fixture(scope="module")
def int8_start(tmp_path_factory, fp32_start, module_env) -> Path:
    """A uniform INT8 QAT checkpoint of tiny_cnn (one short epoch): the start of finetuning."""
    out = tmp_path_factory.mktemp("int8")
    assert in_process("pretrain.py", *QUICK, "--epochs", "1", "--lr", "0.02", "--quant", "uniform", "--hardware",
                      HARDWARE, "--init", fp32_start, "--output-dir", out) == 0
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


def test_prepare_training_optimizes_the_parameters_that_exist_after_loading():
    """Loading a CIM model's state replaces its learned step Parameters: the optimizer must come after."""
    hw = HardwareConfig.from_yaml(HARDWARE)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))]

    def cim_model():
        torch.manual_seed(0)
        return quantize_model(create_model("tiny_cnn", 10), (8, 8), hw, input_size=16, calibration_data=batches)

    cfg = OptimConfig(epochs=2, lr=0.01)
    source = cim_model()
    optimizer = build_optimizer(source, cfg)
    state = make_checkpoint(epoch=1, state_dict=source.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=build_scheduler(optimizer, cfg).state_dict(), args={})
    model = cim_model()
    before = {id(p) for p in model.parameters()}
    run = prepare_training(model, cfg, state, "test state")
    after = {id(p) for p in model.parameters()}
    assert before != after  # the load replaced some Parameters (the steps)
    assert after == {id(p) for group in run.optimizer.param_groups for p in group["params"]}


# ------------------------------------------------------------------ the best/last pair after a kill between its writes
def test_best_and_last_checkpoints_stay_consistent_when_killed_between_the_writes(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    args = QUICK + ["--lr", "0.1", "--epochs", "3"]
    assert in_process("pretrain.py", *args, "--output-dir", straight) == 0
    history = load_checkpoint(straight / "checkpoint.pth.tar")["history"]
    assert history[1]["val"]["top1"] > history[0]["val"]["top1"]  # epoch 2 is a new best: it writes both files
    died = cli("pretrain.py", *args, "--output-dir", interrupted, kill_at="2:best")
    assert killed(died), died.stderr[-2000:]
    # the best file is never older than the checkpoint: here it is one epoch ahead, and the resume redoes that epoch
    assert load_checkpoint(interrupted / "model_best.pth.tar")["epoch"] == 2
    assert load_checkpoint(interrupted / "checkpoint.pth.tar")["epoch"] == 1

    # a write killed half-way leaves its hidden temp file; the next run in the folder removes it
    half = cli("-c", "import os, signal; from lib.fileio import atomic_write; atomic_write("
               f"{str(interrupted / 'metrics.json')!r}, lambda f: (f.write('{{'), f.flush(), "
               "os.kill(os.getpid(), signal.SIGKILL)))")
    assert killed(half) and list(interrupted.glob(".metrics.json.*.tmp"))

    assert in_process("pretrain.py", *args, "--output-dir", interrupted, "--resume", "auto") == 0
    assert_same_run(straight, interrupted)
    assert not list(interrupted.glob(".*.tmp"))
    summary = json.loads((interrupted / "metrics.json").read_text())
    best = load_checkpoint(interrupted / "model_best.pth.tar")
    assert best["epoch"] == summary["best_epoch"] and best["metrics"]["top1"] == summary["best_acc1"]


def test_a_best_file_older_than_the_checkpoints_best_epoch_is_repaired_on_resume(tmp_path, fp32_start, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth.tar").write_bytes(fp32_start.read_bytes())  # epoch 1, its own best epoch
    stale = load_checkpoint(fp32_start)
    stale["epoch"] = 0
    torch.save(stale, run / "model_best.pth.tar")  # as a copy interrupted before the best write would leave it
    assert pretrain.main([str(a) for a in QUICK + ["--epochs", "1", "--output-dir", run, "--resume", "auto"]]) == 0
    assert load_checkpoint(run / "model_best.pth.tar")["epoch"] == 1


# ------------------------------------------------------------------ existing work is never overwritten silently
def test_an_existing_run_is_refused_without_resume_or_overwrite_and_left_byte_identical(tmp_path, fp32_start,
                                                                                       capsys):
    run = fp32_start.parent
    before = snapshot(run)
    for argv in (QUICK + ["--epochs", "1", "--output-dir", run],
                 QUICK + ["--epochs", "1", "--max-batches", "-1", "--output-dir", run],
                 QUICK + ["--epochs", "2", "--lr", "1e30", "--output-dir", run]):
        assert pretrain.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert str(run) in err or "--max-batches=-1" in err, err
        assert snapshot(run) == before
    assert "already holds a run" in refused(cli("pretrain.py", *QUICK, "--epochs", "1", "--output-dir", run), str(run))
    assert snapshot(run) == before

    copy = tmp_path / "copy"
    copy.mkdir()
    for name, (data, _) in before.items():
        (copy / name).write_bytes(data)
    assert pretrain.main([str(a) for a in QUICK + ["--epochs", "1", "--lr", "0.01", "--output-dir", copy,
                                                   "--overwrite"]]) == 0
    assert load_checkpoint(copy / "checkpoint.pth.tar")["args"]["lr"] == 0.01


def test_finetune_and_export_refuse_to_overwrite_existing_work(tmp_path, int8_start, policy_file, capsys):
    run = int8_start.parent
    before = snapshot(run)
    assert finetune.main([str(a) for a in QUICK + ["--policy", policy_file, "--init", int8_start, "--no-export",
                                                   "--output-dir", run]]) == 2
    assert str(run) in capsys.readouterr().err and snapshot(run) == before
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"a user's file")
    assert export_main(["--checkpoint", str(int8_start), "--output", str(onnx)]) == 2
    assert str(onnx) in capsys.readouterr().err and onnx.read_bytes() == b"a user's file"


# ------------------------------------------------------------------ user errors: exit 2, one line, before any work
def test_training_that_diverges_names_epoch_batch_and_tensor_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                                 expect_refusal):
    out = tmp_path / "run"
    # epoch 1 trains at 0.1; the step schedule then multiplies the learning rate by 1e30
    line = expect_refusal(pretrain.main, QUICK + ["--epochs", "3", "--lr", "0.1", "--scheduler", "step",
                                                  "--step-size", "1", "--gamma", "1e30", "--output-dir", out],
                          "epoch 2/3", "became non-finite", "lower the learning rate",
                          "checkpoint.pth.tar (epoch 1) is kept", untouched=tmp_path / "nothing")
    assert " batch " in line and load_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 1


@pytest.fixture
def expect_refusal(capsys):
    def check(main, argv, *names, untouched: Path) -> str:
        before = snapshot(untouched) if untouched.exists() else None
        assert main([str(a) for a in argv]) == 2
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, captured.err
        for name in names:
            assert name in lines[0], (name, lines[0])
        assert (snapshot(untouched) if untouched.exists() else None) == before, f"{untouched} changed"
        return lines[0]
    return check


def test_bad_paths_and_flags_exit_2_naming_the_value_before_any_work(tmp_path, fp32_start, expect_refusal):
    out = tmp_path / "out"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("cell_bits: 2\nrows: [128\nadc_bits: 5\n")
    cases = [
        (pretrain.main, QUICK + ["--epochs", "1", "--output-dir", a_file], (str(a_file), "is a file"), a_file),
        (pretrain.main, QUICK + ["--epochs", "1", "--output-dir", a_file / "sub"], (str(a_file),), a_file),
        (pretrain.main, QUICK + ["--epochs", "1", "--input-size", "0", "--output-dir", out], ("--input-size=0",), out),
        (pretrain.main, QUICK + ["--epochs", "0", "--output-dir", out], ("epochs=0",), out),
        (pretrain.main, QUICK + ["--epochs", "1", "--hardware", HARDWARE, "--output-dir", out],
         ("--hardware", "--quant uniform"), out),
        (pretrain.main, QUICK + ["--epochs", "1", "--quant", "uniform", "--hardware", bad_yaml, "--output-dir", out],
         (str(bad_yaml), "line 3"), out),
        (pretrain.main, QUICK + ["--epochs", "1", "--quant", "uniform", "--w-bit", "17", "--output-dir", out],
         ("w_bit=17", "[1, 16]"), out),
        (pretrain.main, ["--arch", "resnet20", "--resume", fp32_start, "--epochs", "2", "--output-dir", out],
         ("--arch resnet20", "tiny_cnn"), fp32_start.parent),
        (pretrain.main, QUICK + ["--epochs", "1", "--device", "cuda:banana", "--output-dir", out],
         ("cuda:banana",), out),
        (finetune.main, QUICK + ["--input-size", "0", "--policy", "p.npy", "--output-dir", out],
         ("--input-size=0",), out),
        (finetune.main, QUICK + ["--holdout", "1.5", "--policy", "p.npy", "--output-dir", out],
         ("--holdout=1.5",), out),
        (finetune.main, QUICK + ["--arch", "resnet20", "--init", fp32_start, "--policy", "p.npy", "--output-dir",
                                 out], ("--arch resnet20", "tiny_cnn"), out),
        (export_main, ["--checkpoint", fp32_start, "--output", tmp_path], (str(tmp_path), "is a folder"), tmp_path),
        (export_main, ["--checkpoint", fp32_start, "--output", a_file / "m.onnx"], (str(a_file),), a_file),
    ]
    for main, argv, names, untouched in cases:
        expect_refusal(main, argv, *names, untouched=untouched)
    assert not out.exists()


def test_bad_policies_exit_2_naming_the_value_before_any_model_is_built(tmp_path, int8_start, expect_refusal):
    out = tmp_path / "out"

    def json_policy(name: str, bit) -> Path:
        layers = [{"w_bit": w, "a_bit": a} for w, a in TINY_POLICY]
        layers[1]["w_bit"] = bit
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"layers": layers}))
        return path

    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["8", "8"], ["4", "6"], ["3", "5"], ["6", "8"]]))
    too_wide = tmp_path / "too_wide.npy"
    np.save(too_wide, np.array([[8, 8], [17, 6], [3, 5], [6, 8]]))
    cases = [
        (json_policy("boolean", True), ("boolean.json", "w_bit=True")),
        (json_policy("fraction", 4.7), ("fraction.json", "w_bit=4.7")),
        (strings, ("strings.npy", "<U1")),
        (too_wide, ("layer 1", "w_bit=17", "[1, 16]")),
    ]
    for policy, names in cases:
        expect_refusal(finetune.main, QUICK + ["--policy", policy, "--init", int8_start, "--no-export",
                                               "--output-dir", out], *names, untouched=out)
    assert not out.exists()


# ------------------------------------------------------------------ file modes and temp files
def test_written_files_keep_the_users_umask(tmp_path, fp32_start):
    mask = current_umask()
    for path in fp32_start.parent.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    previous = os.umask(0o027)
    try:
        written = atomic_write(tmp_path / "x.json", lambda f: f.write("{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
