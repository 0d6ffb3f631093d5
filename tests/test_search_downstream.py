"""Partial forwards for single-layer measurements (lib.search.downstream), on real CIM layers: after
a change to one layer they give exactly the whole forward's logits, re-run nothing upstream, fall
back where torch.fx cannot trace, and leave the ILP's measured sensitivities unchanged."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import lib.search.downstream as downstream
from lib.cim import HardwareConfig, calibrate, quantizable_layers, quantize_model
from lib.search import run_search
from lib.search.downstream import DownstreamForward
from models import create_model
from search_support import make_int8_checkpoint, tiny_config

REPO = Path(__file__).resolve().parent.parent
HW = HardwareConfig.from_yaml(REPO / "run" / "hardware" / "default.yaml")


@pytest.fixture(scope="module")
def resnet():
    """resnet20 at 16 px, INT8 CIM layers calibrated on random images, in eval mode."""
    torch.manual_seed(0)
    images = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    model = quantize_model(create_model("resnet20", 10), (8, 8), HW, input_size=16, calibration_data=images)
    return model.eval(), [(x, torch.zeros(4, dtype=torch.long)) for x in images]


def test_partial_forward_equals_whole_forward(resnet, eager_single_thread):
    model, batches = resnet
    layers = [layer for _, layer in quantizable_layers(model)]
    forward = DownstreamForward.build(model, layers, batches)
    assert forward is not None
    middle = 9  # inside the second stage: a residual block's conv
    layer = layers[middle]
    layer.set_bits(8, 3)
    calibrate(model, [batches[0][0]], max_batches=1, batch_norm="running")
    with torch.no_grad():
        for b, (x, _) in enumerate(batches):
            assert torch.equal(forward.logits(middle, b), model(x))
    # nothing upstream of the changed layer is in its re-run part
    rerun = {node.target for node in forward._downstream[middle] if node.op == "call_module"}
    names = [name for name, _ in quantizable_layers(model)]
    assert names[middle] in rerun and not rerun & set(names[:middle])
    assert names[-1] in rerun


def test_untraceable_model_falls_back(eager_single_thread):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: torch.fx refuses

    model = Branchy().eval()
    assert DownstreamForward.build(model, [model.fc], [(torch.ones(1, 4), None)]) is None


def test_sensitivities_unchanged_by_partial_forwards(tmp_path, monkeypatch, caplog, eager_single_thread):
    ckpt = make_int8_checkpoint(tmp_path / "int8")

    def scores(folder: str) -> list:
        run_search(tiny_config(ckpt, tmp_path / folder, strategy="ilp", latency_budget=0.6, top_k=0,
                               sensitivity_cache=str(tmp_path / folder / "cache")))
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        return json.loads(next((tmp_path / folder / "cache").glob("kl-*.json")).read_text())["scores"], summary

    caplog.set_level(logging.INFO, logger="lib.search.downstream")
    partial, summary = scores("partial")
    assert summary["sensitivity"]["passes"]["single_layer_forward"] > 0
    assert "whole forwards" not in caplog.text  # the partial forwards were taken
    monkeypatch.setattr(downstream, "MAX_KEPT_BYTES", 0)  # every trial forward a whole one
    whole, _ = scores("whole")
    assert "whole forwards" in caplog.text
    assert partial == whole
