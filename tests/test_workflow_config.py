"""The workflow's experiment YAML: CIM-AQ's layout accepted, bad keys and values refused naming the key."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lib.workflow.config import WorkflowConfigError, load_config
from lib.workflow.steps import build_plan, step_environment
from workflow_support import REPO, experiment_data, write_config

FIXTURE = Path(__file__).parent / "fixtures" / "cim_aq_config_template.yaml"


def refused(path: Path) -> str:
    with pytest.raises(WorkflowConfigError) as info:
        load_config(path)
    return str(info.value)


def test_cim_aq_config_template_layout_is_accepted(tmp_path, make_image_tree):
    data = yaml.safe_load(FIXTURE.read_text())
    data["datasets"]["small"]["root"] = str(make_image_tree(tmp_path / "imagenet100"))
    data["datasets"]["large"]["root"] = str(make_image_tree(tmp_path / "imagenet", classes=("a", "b")))
    data["output"]["root"] = str(tmp_path / "runs")
    config = load_config(write_config(tmp_path, data))
    assert config.arch == "vgg16" and config.input_size == 224
    assert (config.small_kind, config.large_kind) == ("imagefolder", "imagefolder")
    assert config.experiment_dir == tmp_path / "runs" / "per-tensor_no_constraint_vgg16_default"
    assert config.raw.training.rl.train_episodes == 600 and config.raw.dataloader.num_workers == 32
    plan = build_plan(config)
    assert [s.name for s in plan][:3] == ["stage1/fp32", "stage1/int8", "stage1/search"]
    assert "stage2/finetune" in [s.name for s in plan]
    search = next(s for s in plan if s.name == "stage1/search")
    assert "--force-first-last" in search.argv and "--finetune-epochs" in search.argv


def test_cim_aq_amp_space_management_and_names_are_accepted(tmp_path):
    data = experiment_data(tmp_path, amp={"enable": True}, space_management={"cleanup_checkpoints": True},
                       models={"quant_model": "qresnet20", "fp32_model": "custom_resnet20"})
    data["datasets"]["small"]["name"] = "digits-small"
    config = load_config(write_config(tmp_path, data))
    assert config.arch == "resnet20" and config.raw.amp.enable


def test_typo_in_a_key_is_refused_with_the_closest_key(tmp_path):
    data = experiment_data(tmp_path)
    data["quantization"]["max_acuracy_drop"] = data["quantization"].pop("max_accuracy_drop")
    message = refused(write_config(tmp_path, data))
    assert "quantization.max_acuracy_drop: unknown key; did you mean 'max_accuracy_drop'?" in message


def test_impossible_bit_ranges_are_refused_naming_the_key(tmp_path):
    assert "quantization.min_bit=6 > quantization.max_bit=4" in refused(
        write_config(tmp_path, experiment_data(tmp_path, quantization={"min_bit": 6, "max_bit": 4})))
    assert "quantization.max_bit=17 is not allowed: expected 1..16" in refused(
        write_config(tmp_path, experiment_data(tmp_path, quantization={"max_bit": 17})))
    message = refused(write_config(tmp_path, experiment_data(tmp_path, quantization={
        "min_bit": 5, "max_bit": 7, "consider_cell_resolution": True})))
    assert "quantization.consider_cell_resolution" in message and "cell_bits=4" in message


def test_wrong_types_missing_roots_unknown_names_and_bad_hardware_are_refused(tmp_path):
    data = experiment_data(tmp_path)
    data["training"]["rl"]["train_episodes"] = "many"
    assert "training.rl.train_episodes" in refused(write_config(tmp_path, data))
    data = experiment_data(tmp_path)
    data["datasets"]["small"] = {"name": "imagenet100", "root": str(tmp_path / "nowhere")}
    assert "datasets.small.root" in refused(write_config(tmp_path, data))
    data["datasets"]["small"] = {"name": "imagenet1k"}
    assert "datasets.small.name" in refused(write_config(tmp_path, data)) and "imagenet100" in refused(write_config(tmp_path, data))
    assert "models.quant_model" in refused(write_config(tmp_path, experiment_data(tmp_path, models={"quant_model": "qresnet99"})))
    bad_hw = tmp_path / "hw.yaml"
    bad_hw.write_text("rows: [not, a, number]\n")
    assert "hardware.config" in refused(write_config(tmp_path, experiment_data(tmp_path, hardware={"config": str(bad_hw)})))


def test_cli_refuses_a_bad_config_with_one_line_and_exit_2_before_any_work(tmp_path):
    data = experiment_data(tmp_path)
    data["datasets"]["small"]["nmae"] = "digits"
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "lib.workflow", str(write_config(tmp_path, data))], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "datasets.small.nmae: unknown key; did you mean 'name'?" in errors[0]
    assert time.time() - started < 30 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, arch", [("resnet18_imagenet.yaml", "resnet18"), ("vgg16_imagenet.yaml", "vgg16")])
def test_imagenet_configs_are_valid_once_their_roots_exist(tmp_path, make_image_tree, name, arch):
    data = yaml.safe_load((REPO / "run" / "configs" / name).read_text())
    data["datasets"]["small"]["root"] = str(make_image_tree(tmp_path / "imagenet100"))
    data["datasets"]["large"]["root"] = str(make_image_tree(tmp_path / "imagenet"))
    config = load_config(write_config(tmp_path, data))
    assert config.arch == arch and config.raw.quantization.consider_cell_resolution
    assert config.experiment_dir.name == f"both_constraints_{arch}_default"


@pytest.mark.parametrize("name", ["demo.yaml", "test.yaml", "template.yaml"])
def test_shipped_configs_are_valid(name):
    assert load_config(REPO / "run" / "configs" / name).stage2_enabled


@pytest.mark.parametrize("value, expected", [(None, {}), (False, {"CIM_AQ_COMPILE": "0"}),
                                             (True, {"CIM_AQ_COMPILE": "1"})])
def test_compile_kernels_sets_every_steps_environment(tmp_path, value, expected):
    data = experiment_data(tmp_path, device={"compile_kernels": value, "gpu_id": None})
    assert step_environment(load_config(write_config(tmp_path, data))) == expected


@pytest.mark.parametrize("value", [None, "bfloat16", "float32"])
def test_gradient_products_sets_every_steps_environment(tmp_path, value):
    data = experiment_data(tmp_path, device={"gradient_products": value, "gpu_id": None})
    expected = {} if value is None else {"CIM_AQ_GRADIENT_PRODUCTS": value}
    assert step_environment(load_config(write_config(tmp_path, data))) == expected
    data = experiment_data(tmp_path, device={"gradient_products": "bf16"})
    assert "device.gradient_products" in refused(write_config(tmp_path, data, "bad.yaml"))


def test_gpu_id_reaches_every_step_and_compile_kernels_takes_only_booleans(tmp_path):
    data = experiment_data(tmp_path, device={"gpu_id": "0,1"})
    assert step_environment(load_config(write_config(tmp_path, data))) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    data = experiment_data(tmp_path, device={"compile_kernels": "sometimes"})
    assert "device.compile_kernels" in refused(write_config(tmp_path, data, "bad.yaml"))


def test_objective_and_budgets_reach_the_search_and_need_an_energy_model(tmp_path):
    data = experiment_data(tmp_path, quantization={"objective": "energy", "budgets": {"energy": 0.6, "latency": 0.5}})
    search = next(s for s in build_plan(load_config(write_config(tmp_path, data))) if s.name == "stage1/search")
    argv = list(search.argv)
    assert argv[argv.index("--objective") + 1] == "energy"
    assert argv[argv.index("--budget") + 1] == "energy=0.6,latency=0.5"
    plain = next(s for s in build_plan(load_config(write_config(tmp_path, experiment_data(tmp_path))))
                 if s.name == "stage1/search")
    assert "--objective" not in plain.argv and "--budget" not in plain.argv  # unchanged unless asked
    assert "quantization.budgets.power.[key]" in refused(
        write_config(tmp_path, experiment_data(tmp_path, quantization={"budgets": {"power": 0.5}})))
    assert "quantization.objective" in refused(
        write_config(tmp_path, experiment_data(tmp_path, quantization={"objective": "speed"})))
    message = refused(write_config(tmp_path, experiment_data(tmp_path, quantization={"objective": "edp"},
                                                             hardware={"config": "run/hardware/cim_aq_default.yaml"})))
    assert "quantization objective/budgets ['edp'] need an `energy` section" in message
    assert "disagree" in refused(write_config(tmp_path, experiment_data(
        tmp_path, quantization={"latency_budget": 0.5, "budgets": {"latency": 0.6}})))
