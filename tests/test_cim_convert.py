"""quantize_model / quantizable_layers / apply_policy on real torchvision models."""
import pytest
import torch
import torchvision
from torch import nn

from lib.cim import (CIMConv2d, CIMLayerMixin, CIMLinear, ConversionError, HardwareConfig, apply_policy, calibrate,
                     current_policy, quantizable_layers, quantize_model)
from lib.layer_trace import example_input_for, trace_layer_calls
from lib.policy import Policy, PolicyError

HW = HardwareConfig(rows=256, cols=256, cell_bits=2, adc_bits=6, psum_granularity="column")


def _small_vit():
    return torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


@pytest.mark.parametrize("name,build,size,exclude", [
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), 32, ()),
    ("vgg11", lambda: torchvision.models.vgg11(num_classes=10), 32, ()),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10), 32, ()),
    ("vit_b_32-style", _small_vit, 64, ("conv_proj",)),
])
def test_torchvision_models_convert_and_train(name, build, size, exclude):
    torch.manual_seed(0)
    model = build()
    float_names = [c.name for c in trace_layer_calls(model, example_input_for(model, size)) if c.name not in exclude]
    quantize_model(model, (4, 5), HW, input_size=size, exclude=exclude)
    layers = quantizable_layers(model)
    assert [n for n, _ in layers] == float_names  # call order, every called Conv2d/Linear converted
    assert all(isinstance(layer, CIMLayerMixin) for _, layer in layers)
    x = torch.randn(2, 3, size, size)
    calibrate(model, [x])
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(layer.weight.grad is not None for _, layer in layers)


def test_vit_linear_layers_convert_and_patch_conv_too_large_is_a_clear_error():
    with pytest.raises(Exception, match="conv_proj: one kernel needs 256 rows but an array holds 64"):
        quantize_model(_small_vit(), (8, 8), HW.with_overrides(rows=64), input_size=64)


def test_resnet18_order_puts_downsample_where_it_is_called_and_signs_follow_the_graph():
    model = quantize_model(torchvision.models.resnet18(num_classes=10), (8, 8), HW, input_size=32)
    names = [n for n, _ in quantizable_layers(model)]
    assert names[:8] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                         "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert names[-1] == "fc" and len(names) == 21
    layers = dict(quantizable_layers(model))
    assert layers["conv1"].input_signed  # network input
    assert not layers["layer2.0.downsample.0"].input_signed  # block input comes out of a ReLU
    assert not layers["fc"].input_signed  # ReLU → avgpool → flatten


def test_signedness_comes_from_the_graph_not_the_position():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 1)  # input: ReLU output
            self.c = nn.Conv2d(4, 4, 1)  # input: conv output (can be negative)
            self.d = nn.Conv2d(4, 4, 1)  # input: maxpool of ReLU

        def forward(self, x):
            x = torch.relu(self.a(x))
            y = self.b(x)
            z = self.c(y)
            return self.d(nn.functional.max_pool2d(torch.relu(z), 2)) + z[..., :1, :1]

    model = quantize_model(Net(), (8, 8), HW, input_size=12)
    signed = {n: l.input_signed for n, l in quantizable_layers(model)}
    assert signed == {"a": True, "b": False, "c": True, "d": False}


def test_module_map_instance_map_and_exclude():
    model = torchvision.models.resnet18(num_classes=10)
    quantize_model(model, (8, 8), HW, input_size=32, exclude=["conv1"],
                   instance_map={"fc": {"w_bit": 3, "a_bit": 5, "adc_bits": 4}})
    assert type(model.conv1) is nn.Conv2d
    assert isinstance(model.fc, CIMLinear) and (model.fc.w_bit, model.fc.a_bit, model.fc.adc_bits) == (3, 5, 4)
    assert isinstance(model.layer1[0].conv1, CIMConv2d) and model.layer1[0].conv1.w_bit == 8
    with pytest.raises(ConversionError, match="unknown layer name"):
        quantize_model(torchvision.models.resnet18(), (8, 8), HW, exclude=["nope"])
    with pytest.raises(ConversionError, match="bits="):
        quantize_model(torchvision.models.resnet18(), (8,), HW)


def test_apply_policy_sets_bits_and_refuses_mismatches():
    model = quantize_model(torchvision.models.resnet18(num_classes=10), (8, 8), HW, input_size=32)
    names = [n for n, _ in quantizable_layers(model)]
    policy = Policy([2 + i % 7 for i in range(21)], [3 + i % 6 for i in range(21)], [4 + i % 5 for i in range(21)], names)
    apply_policy(model, policy)
    now = current_policy(model)
    assert now.w_bits == policy.w_bits and now.a_bits == policy.a_bits and now.adc_bits == policy.adc_bits
    with pytest.raises(PolicyError, match="20 layers but the model has 21"):
        apply_policy(model, Policy([4] * 20, [4] * 20))
    wrong = Policy([4] * 21, [4] * 21, layer_names=names[:-1] + ["classifier"])
    with pytest.raises(PolicyError, match="'classifier'"):
        apply_policy(model, wrong)


def test_converted_model_state_dict_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = quantize_model(torchvision.models.resnet18(num_classes=10), (8, 8), HW, input_size=32)
    names = [n for n, _ in quantizable_layers(model)]
    apply_policy(model, Policy([3 + i % 6 for i in range(21)], [4 + i % 5 for i in range(21)], layer_names=names))
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, [x])
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = quantize_model(torchvision.models.resnet18(num_classes=10), (8, 8), HW, input_size=32)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"))
    fresh.eval()
    assert current_policy(fresh).w_bits == current_policy(model).w_bits
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
