"""lib.model_spec: the typed model description read from (and written to) checkpoint args, and the
one builder of models (fresh, from a checkpoint, at a policy from an INT8 start)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pretrain
from lib.cim import ConversionError, HardwareConfig, current_policy, quantize_model
from lib.model_spec import (DEFAULT_HARDWARE, ModelSpec, ModelSpecError, build_model, check_policy, cost_model_for,
                            model_at_policy, model_from_checkpoint)
from lib.policy import Policy, PolicyError
from lib.training import CheckpointError, load_checkpoint
from models import create_model

REPO = Path(__file__).resolve().parents[1]
CELL2 = REPO / "run" / "hardware" / "cell2bit.yaml"
NAMES = ["features.0", "features.3", "features.6", "fc"]
DATA = ["--dataset", "digits-small", "--input-size", "8", "--batch-size", "32", "--workers", "0", "--max-batches", "1",
        "--epochs", "1", "--no-progress", "--no-tensorboard", "--arch", "tiny_cnn"]

pytestmark = pytest.mark.usefixtures("eager_single_thread")


@pytest.fixture(scope="module")
def int8(tmp_path_factory) -> Path:
    """A uniform INT8 checkpoint written by pretrain.py (the format every existing checkpoint has)."""
    root = tmp_path_factory.mktemp("spec")
    assert pretrain.main(DATA + ["--output-dir", str(root / "fp32")]) == 0
    assert pretrain.main(DATA + ["--quant", "uniform", "--init", str(root / "fp32" / "model_best.pth.tar"),
                                 "--output-dir", str(root / "int8")]) == 0
    return root / "int8" / "model_best.pth.tar"


def test_spec_reads_pretrain_args_and_writes_the_same_keys(int8):
    args = load_checkpoint(int8)["args"]
    spec = ModelSpec.from_args(args)
    assert (spec.arch, spec.num_classes, spec.input_size, spec.dataset, spec.quant, spec.w_bit, spec.a_bit) == \
        ("tiny_cnn", 10, 8, "digits-small", "uniform", 8, 8)
    assert spec.hardware == HardwareConfig.from_dict(args["hardware_config"])
    again = ModelSpec.from_args(spec.to_args())
    assert again == spec and again.to_args() == spec.to_args()
    assert {k: args[k] for k in ("arch", "num_classes", "input_size", "quant", "w_bit", "a_bit", "hardware_config")} \
        == {k: spec.to_args()[k] for k in ("arch", "num_classes", "input_size", "quant", "w_bit", "a_bit",
                                           "hardware_config")}
    with pytest.raises(CheckpointError, match="lack 'hardware_config'"):
        ModelSpec.from_args({**args, "hardware_config": None})
    with pytest.raises(CheckpointError, match="quant='bogus'"):
        ModelSpec.from_args({**args, "quant": "bogus"})
    with pytest.raises(ModelSpecError, match="needs a policy"):
        spec.replace(quant="mixed")


def test_checkpoint_rebuilds_the_same_model(int8):
    model, state = model_from_checkpoint(int8)
    images = torch.randn(4, 3, 8, 8)
    again, _ = model_from_checkpoint(state)
    model.eval(), again.eval()
    assert torch.equal(model(images), again(images))
    assert current_policy(model).w_bits == [8] * 4


def test_model_at_policy_from_int8_keeps_weights_and_sets_bits(int8):
    state = load_checkpoint(int8)
    spec = ModelSpec.from_args(state["args"])
    policy = Policy([8, 4, 3, 6], [8, 6, 5, 8], None, NAMES)
    images = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    model = model_at_policy(spec, policy, spec.hardware, state, calibration=images)
    got = current_policy(model)
    assert (got.w_bits, got.a_bits, got.layer_names) == ([8, 4, 3, 6], [8, 6, 5, 8], NAMES)
    assert torch.equal(model.state_dict()["fc.weight"], state["state_dict"]["fc.weight"])
    # other hardware: only the float weights carry over, the layers live on the new crossbar
    cell2 = HardwareConfig.from_yaml(CELL2)
    moved = model_at_policy(spec, policy, cell2, state, calibration=images)
    assert all(layer.hw == cell2 for layer in (m for m in moved.modules() if hasattr(m, "psum_adc")))
    assert torch.equal(moved.state_dict()["fc.weight"], state["state_dict"]["fc.weight"])
    mixed = spec.at_policy(policy)
    rebuilt = build_model(mixed)
    assert current_policy(rebuilt).w_bits == [8, 4, 3, 6]
    assert ModelSpec.from_args(mixed.to_args()).policy.to_json_dict() == policy.to_json_dict()


def test_check_policy_and_dims_table_length(int8):
    spec = ModelSpec.from_args(load_checkpoint(int8)["args"])
    unnamed = Policy([4] * 4, [4] * 4)
    cost = check_policy(unnamed, spec, spec.hardware)
    assert unnamed.layer_names == NAMES and 0 < cost.ratio < 1
    with pytest.raises(PolicyError, match="policy has 3 layers but the model has 4"):
        check_policy(Policy([4] * 3, [4] * 3), spec, spec.hardware)
    with pytest.raises(ModelSpecError, match="has 21 rows but tiny_cnn has 4 quantizable layers"):
        cost_model_for(spec, spec.hardware, layer_dims=REPO / "run" / "layer_dims" / "resnet18_224.yaml")


def test_quantize_model_refuses_per_layer_tuples_and_untraceable_inputs():
    hw = HardwareConfig.from_yaml(DEFAULT_HARDWARE)
    with pytest.raises(ConversionError, match=r"bits=\[\(8, 8\), \(4, 4\)\] is not allowed.*a Policy"):
        quantize_model(create_model("tiny_cnn", 10), [(8, 8), (4, 4)], hw, input_size=8)
    with pytest.raises(ConversionError, match=r"input_size=\(1, 8, 8\) cannot be traced through TinyCNN"):
        quantize_model(create_model("tiny_cnn", 10), (8, 8), hw, input_size=(1, 8, 8))
