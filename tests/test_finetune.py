"""finetune.py: a policy (CIM-AQ .npy or our .json) is validated, trained on CIM layers from a uniform
INT8 or FP32 start, exported to ONNX and reported; --evaluate and --resume; mismatches are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import finetune
import pretrain
from lib.export.checkpoint_model import model_from_checkpoint
from lib.policy import Policy
from lib.training import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = ["--dataset", "digits", "--input-size", "8", "--batch-size", "64", "--workers", "0", "--seed", "1",
        "--no-progress"]
TINY_LAYERS = ["features.0", "features.3", "features.6", "fc"]


pytestmark = pytest.mark.usefixtures("eager_single_thread")


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    """FP32 tiny_cnn (3 epochs on digits at 8x8) and its uniform INT8 QAT checkpoint (1 epoch)."""
    root = tmp_path_factory.mktemp("starts")
    assert pretrain.main(DATA + ["--arch", "tiny_cnn", "--epochs", "3", "--lr", "0.1", "--no-tensorboard",
                                 "--output-dir", str(root / "fp32")]) == 0
    assert pretrain.main(DATA + ["--arch", "tiny_cnn", "--epochs", "1", "--lr", "0.01", "--quant", "uniform",
                                 "--hardware", str(REPO / "run" / "hardware" / "cim_aq_default.yaml"),
                                 "--init", str(root / "fp32" / "model_best.pth.tar"), "--no-tensorboard",
                                 "--output-dir", str(root / "int8")]) == 0
    return {"fp32": root / "fp32" / "model_best.pth.tar", "int8": root / "int8" / "model_best.pth.tar"}


def _run(argv) -> int:
    return finetune.main([str(a) for a in argv])


def test_finetune_from_uniform_int8_with_a_cim_aq_npy_policy(tmp_path, starts, capsys):
    policy_file = tmp_path / "cim_aq_policy.npy"
    np.save(policy_file, np.array([[8, 8], [4, 6], [3, 5], [6, 8]], dtype=np.float64))  # CIM-AQ saves floats
    out = tmp_path / "mixed"
    assert _run(DATA + ["--policy", policy_file, "--init", starts["int8"], "--epochs", "2", "--lr", "0.01",
                        "--output-dir", out]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert [(l["name"], l["w_bit"], l["a_bit"]) for l in report["policy"]["layers"]] == \
        list(zip(TINY_LAYERS, [8, 4, 3, 6], [8, 6, 5, 8]))
    assert report["accuracy"]["test_top1"] > 30 and report["accuracy"]["selected_on"] == "holdout"
    assert report["accuracy"]["test_samples"] == 359  # the val split (20% of 1,797) is the test set
    assert 0 < report["latency_ratio"] < 1 and report["baseline_bits"] == [8, 8]
    assert report["latency_us"] < report["baseline_latency_us"]
    assert report["arrays"] >= 4 and report["adc_conversions"] > 0
    assert report["energy_pj"] is None and report["energy_ratio"] is None  # CIM-AQ's layout: no energy model
    assert report["ort_top1_agreement"] >= 0.99 and report["ort_max_abs_diff"] < 0.05
    assert printed["ort_top1_agreement"] == report["ort_top1_agreement"]
    assert sorted(report["routes"]) == sorted(TINY_LAYERS)  # every CIM layer's routes, training ones among them
    assert any(entry["route"].startswith("chain=cim path=crossbar weights=fused") and entry["forwards"] > 0
               for entry in report["routes"][TINY_LAYERS[1]])
    assert report["kernels"]["compile"] in ("auto", "0", "1")
    assert (out / "model.onnx").is_file() and list((out / "tb").glob("events.out.tfevents.*"))
    assert Policy.load(out / "policy.npy").w_bits == [8, 4, 3, 6]
    assert Policy.load(out / "policy.json").layer_names == TINY_LAYERS

    state = load_checkpoint(out / "model_best.pth.tar")
    assert state["args"]["quant"] == "mixed" and state["args"]["arch"] == "tiny_cnn"
    model, _ = model_from_checkpoint(out / "model_best.pth.tar")
    from lib.cim import current_policy

    assert current_policy(model).w_bits == [8, 4, 3, 6] and current_policy(model).a_bits == [8, 6, 5, 8]

    # --evaluate scores the best checkpoint on the test (val) split: the reported accuracy
    assert _run(["--evaluate", "--resume", out / "model_best.pth.tar", "--workers", "0", "--no-progress"]) == 0
    evaluated = json.loads((out / "eval_metrics.json").read_text())
    assert evaluated["val"]["top1"] == pytest.approx(report["accuracy"]["test_top1"])

    # --resume continues the same run (policy and hardware come from the checkpoint)
    before = load_checkpoint(out / "checkpoint.pth.tar")
    assert _run(["--resume", out / "checkpoint.pth.tar", "--epochs", "3", "--batch-size", "64", "--workers", "0",
                 "--seed", "1", "--lr", "0.01", "--no-progress", "--no-export"]) == 0
    resumed = load_checkpoint(out / "checkpoint.pth.tar")
    assert resumed["epoch"] == 3 and len(resumed["history"]) == 3
    assert resumed["history"][:2] == before["history"]


def test_finetune_from_fp32_with_a_json_policy_other_hardware_and_adc_bits(tmp_path, starts):
    policy = Policy([6, 5, 4, 8], [8, 6, 6, 8], adc_bits=[6, 5, 5, 7], layer_names=TINY_LAYERS)
    policy.save(tmp_path / "p")
    out = tmp_path / "run"
    assert _run(DATA + ["--policy", tmp_path / "p.json", "--init", starts["fp32"], "--epochs", "1", "--lr", "0.01",
                        "--hardware", REPO / "run" / "hardware" / "cell2bit.yaml", "--output-dir", out]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["hardware"]["cell_bits"] == 2
    assert [l["adc_bits"] for l in report["policy"]["layers"]] == [6, 5, 5, 7]
    split = report["energy_split_pj"]  # cell2bit.yaml has an energy model: energy beside latency
    assert report["energy_pj"] == pytest.approx(sum(split.values())) and 0 < report["energy_ratio"] < 1
    assert report["ort_top1_agreement"] >= 0.99
    model, _ = model_from_checkpoint(out / "model_best.pth.tar")
    from lib.cim import quantizable_layers

    assert [layer.adc_bits for _, layer in quantizable_layers(model)] == [6, 5, 5, 7]


def test_policies_that_do_not_fit_are_refused_before_training(tmp_path, starts, capsys):
    short = tmp_path / "short.npy"
    np.save(short, np.array([[8, 8], [4, 4], [4, 4]]))
    out = tmp_path / "refused"
    assert _run(DATA + ["--policy", short, "--init", starts["int8"], "--epochs", "1", "--output-dir", out]) == 2
    assert "policy has 3 layers but the model has 4" in capsys.readouterr().err
    assert not (out / "checkpoint.pth.tar").exists()

    renamed = Policy([8] * 4, [8] * 4, layer_names=["features.0", "features.3", "features.7", "fc"])
    renamed.save(tmp_path / "renamed")
    assert _run(DATA + ["--policy", tmp_path / "renamed.json", "--init", starts["int8"], "--epochs", "1",
                        "--output-dir", out]) == 2
    assert "policy layer 2 is 'features.7'" in capsys.readouterr().err
    assert not (out / "checkpoint.pth.tar").exists()

    assert _run(DATA + ["--policy", tmp_path / "missing.npy", "--init", starts["int8"], "--output-dir", out]) == 2
    assert "does not exist" in capsys.readouterr().err
