"""Model registry: torchvision and CIFAR models with the right head, local-only pretrained weights."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models import ModelError, classifier_name, create_model, list_models


@pytest.mark.parametrize("name, head, size", [
    ("resnet18", "fc", 64),
    ("mobilenet_v2", "classifier.1", 64),
    ("squeezenet1_0", "classifier.1", 64),
    ("googlenet", "fc", 64),
    ("vit_b_32", "heads.head", 224),
])
def test_torchvision_models_get_a_resized_head(name, head, size):
    model = create_model(name, num_classes=7)
    assert classifier_name(model) == head
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 7)


def test_registry_lists_every_torchvision_classifier_and_ours():
    names = set(list_models())
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names
    assert {"resnet20", "resnet32", "tiny_cnn", "vgg16_bn", "vit_b_32"} <= names


@pytest.mark.parametrize("name, params, convs", [("resnet20", 0.27e6, 19), ("resnet32", 0.46e6, 31)])
def test_cifar_resnets(name, params, convs):
    model = create_model(name, num_classes=100)
    assert model.fc.out_features == 100
    assert abs(sum(p.numel() for p in model.parameters()) - params) / params < 0.05
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    for size in (32, 16):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 100)


def test_tiny_cnn_is_tiny():
    model = create_model("tiny_cnn", num_classes=10)
    assert 1_000 < sum(p.numel() for p in model.parameters()) < 10_000
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 10)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ModelError, match=r"resnet20") as err:
        create_model("resnet2", 10)
    assert "unknown model 'resnet2'" in str(err.value)
    with pytest.raises(ModelError, match="tiny_cnn"):
        create_model("tiny_cn", 10)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("tiny_cnn", 0)


def test_pretrained_weights_from_local_files(tmp_path):
    source = create_model("resnet20", 10)
    plain = tmp_path / "plain.pth"
    torch.save(source.state_dict(), plain)
    same = create_model("resnet20", 10, pretrained=plain)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), same.state_dict().values()))

    wrapped = tmp_path / "torchvision_style.pth"  # {'model': ..., 'epoch': ...} with DataParallel prefixes
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    fewer = create_model("resnet20", 5, pretrained=wrapped)
    assert fewer.fc.out_features == 5  # head resized and left fresh
    assert torch.equal(fewer.conv1.weight, source.conv1.weight)
    assert torch.equal(fewer.layer3[2].conv2.weight, source.layer3[2].conv2.weight)


def test_bad_pretrained_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="local file"):
        create_model("resnet18", 10, pretrained="https://download.pytorch.org/models/resnet18.pth")
    with pytest.raises(ModelError, match="does not exist"):
        create_model("resnet20", 10, pretrained=tmp_path / "missing.pth")
    foreign = tmp_path / "tiny.pth"
    torch.save(create_model("tiny_cnn", 10).state_dict(), foreign)
    with pytest.raises(ModelError, match="does not fit CifarResNet"):
        create_model("resnet20", 10, pretrained=foreign)
    truncated = tmp_path / "truncated.pth"
    torch.save(create_model("resnet20", 10).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ModelError, match="truncated"):
        create_model("resnet20", 10, pretrained=truncated)
