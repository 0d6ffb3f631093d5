"""The search environment: bit mapping, cell constraint, forced layers, budget mode, state rows in call
order (ResNet downsample convs), and registry models of every kind (depthwise, VGG-style, ResNet)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib.cim import HardwareConfig, apply_policy, quantizable_layers, quantize_model
from lib.model_spec import DEFAULT_HARDWARE
from lib.policy import Policy
from lib.search import DDPGConfig, action_to_bits, prepare, run_search
from lib.search.budget import lower_to_budget
from lib.search.search import Search
from lib.search.space import BitSpace
from lib.search.state import KIND_CODE, STATIC, StateEncoder, raw_layer_features
from lib.simulator import CostModel
from models import LOCAL_MODELS
from search_support import make_int8_checkpoint, tiny_config

REPO = Path(__file__).resolve().parent.parent
CELL2 = REPO / "run" / "hardware" / "cell2bit.yaml"
SMALL_AGENT = DDPGConfig(hidden1=16, hidden2=16, bsize=8)


@pytest.fixture(scope="module")
def int8_ckpt(tmp_path_factory) -> Path:
    return make_int8_checkpoint(tmp_path_factory.mktemp("int8_env"))


def test_actions_map_to_bits_by_equal_width_intervals():
    # 2..8 is 7 choices: [0, 1/7) -> 2, [1/7, 2/7) -> 3, ..., [6/7, 1] -> 8
    assert [action_to_bits(a, 2, 8) for a in (0.0, 1 / 7 - 1e-9, 1 / 7, 3.5 / 7, 6 / 7 - 1e-9, 6 / 7, 1.0)] == \
        [2, 2, 3, 5, 7, 8, 8]
    counts = np.bincount([action_to_bits(a, 2, 8) for a in np.linspace(0, 1, 7001)[:-1]], minlength=9)[2:]
    assert counts.tolist() == [1000] * 7


def test_cell_constraint_allows_only_multiples_of_cell_bits(int8_ckpt, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path, hardware=str(CELL2), min_bit=2, max_bit=8,
                         cell_resolution_constraint=True)
    space = prepare(config).space
    assert space.weight_bits == (2, 4, 6, 8) and space.input_bits == tuple(range(2, 9))
    assert [space.bits(a, "w") for a in (0.0, 0.26, 0.5, 0.99)] == [2, 4, 6, 8]
    search = Search(config, prepare(config), None)
    for _ in range(5):
        policy, _ = search.propose()
        assert all(b % 2 == 0 for b in policy.w_bits)


def test_forced_first_last_are_fixed_and_not_learned_from(int8_ckpt, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path, force_first_last=8, min_bit=2, max_bit=4, search_adc=True,
                         min_adc_bit=3, max_adc_bit=5, search_free_bits=True)  # every decision searched
    search = Search(config, prepare(config), None)
    policy, transitions = search.propose()
    assert (policy.w_bits[0], policy.a_bits[0], policy.w_bits[-1], policy.a_bits[-1]) == (8, 8, 8, 8)
    assert all(2 <= b <= 4 for b in policy.w_bits[1:-1] + policy.a_bits[1:-1])
    assert all(3 <= b <= 5 for b in policy.adc_bits)
    # 4 layers × 3 decisions, minus the forced w and a of the first and last layer
    assert len(transitions) == 12 - 4
    assert policy.as_array().shape == (4, 3)


def test_free_decisions_are_held_and_not_learned_from(int8_ckpt, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path, force_first_last=8, min_bit=2, max_bit=4, search_adc=True,
                         min_adc_bit=3, max_adc_bit=5)
    setup = prepare(config)
    held = {(d.layer, d.decision) for d in setup.held.free}
    # default.yaml: tiny_cnn's weights fit one array at any width, the fixed-time ADC costs no latency
    assert held == {(1, "w"), (2, "w")} | {(i, "adc") for i in range(4)}
    policy, transitions = Search(config, setup, None).propose()
    assert policy.w_bits[1:3] == [4, 4] and policy.adc_bits == [5, 5, 5, 5]
    assert len(transitions) == 2  # the input bits of the two middle layers


def test_budget_mode_lowers_exactly_to_the_budget(int8_ckpt, tmp_path):
    config = tiny_config(int8_ckpt, tmp_path, latency_budget=0.85, force_first_last=8)
    setup = prepare(config)
    start = Policy.uniform(setup.names, 8, 8)
    steps = []
    lowered = lower_to_budget(start, setup.cost_model, setup.space, 0.85, steps)
    ratios = [setup.cost_model.policy_cost(lowered).ratio] + [r for *_, r in steps]
    assert ratios[0] <= 0.85 and ratios[0] == pytest.approx(steps[-1][3])
    previous = setup.cost_model.policy_cost(Policy.uniform(setup.names, 8, 8)).ratio if len(steps) == 1 else steps[-2][3]
    assert previous > 0.85  # the greedy loop stopped at the first policy inside the budget
    assert (lowered.w_bits[0], lowered.a_bits[0], lowered.w_bits[-1], lowered.a_bits[-1]) == (8, 8, 8, 8)
    assert all(later < earlier for (*_, later), (*_, earlier) in zip(steps[1:], steps[:-1]))


def test_budget_search_evaluates_only_policies_within_budget(int8_ckpt, tmp_path, eager_single_thread):
    out = tmp_path / "budget"
    run_search(tiny_config(int8_ckpt, out, latency_budget=0.6, ddpg=SMALL_AGENT, top_k=0))
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert records and all(r["latency_ratio"] <= 0.6 for r in records)


class DownsampleFirst(nn.Module):
    """A ResNet basic block stack whose downsample conv is registered before the convs it runs after."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out = torch.relu(out + self.downsample(x))
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize("build", [DownsampleFirst, lambda: LOCAL_MODELS["resnet20"](num_classes=10),
                                   lambda: __import__("models").create_model("resnet18", 10)],
                         ids=["downsample-registered-first", "resnet20", "resnet18"])
def test_state_row_describes_the_layer_being_set(build, tmp_path):
    model = build()
    hw = HardwareConfig.from_yaml(DEFAULT_HARDWARE)
    cost_model = CostModel.from_model(model, hw, 16)
    space = BitSpace((2, 3, 4), (2, 3, 4), None, None, len(cost_model))
    encoder = StateEncoder(cost_model, space)
    names = cost_model.layer_names
    registered = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if isinstance(model, DownsampleFirst):
        assert registered != names  # the case where module-definition order would mislabel rows
    modules = dict(model.named_modules())
    scale = np.max([[raw_layer_features(cost_model, i)[k] for k in STATIC[2:]] for i in range(len(names))], axis=0)
    for i, name in enumerate(names):
        module = modules[name]
        conv = isinstance(module, nn.Conv2d)
        expected = [module.in_channels if conv else module.in_features,
                    module.out_channels if conv else module.out_features,
                    module.kernel_size[0] * module.kernel_size[1] if conv else 1,
                    module.stride[0] if conv else 1]
        for decision in ("w", "a"):
            row = encoder.row(i, decision, 4, 4, 0.3)
            assert row[0] == pytest.approx(i / (len(names) - 1))
            assert row[1] == KIND_CODE["conv" if conv else "linear"]
            assert np.allclose(row[2:6] * scale[:4], expected), (i, name)
    # the policy applied to row i's bits lands on the module the row described
    quantize_model(model, (8, 8), hw, input_size=16)
    assert [n for n, _ in quantizable_layers(model)] == names
    w_bits = [2 + i % 7 for i in range(len(names))]
    apply_policy(model, Policy(w_bits, [8] * len(names), None, names))
    assert [modules_after.w_bit for _, modules_after in quantizable_layers(model)] == w_bits
    assert all(dict(model.named_modules())[n].w_bit == w for n, w in zip(names, w_bits))


class TinyVGG(nn.Module):
    """VGG-style: plain conv-ReLU stacks with max pooling and a two-layer classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "resnet20", "tiny_vgg"])
def test_search_runs_on_registry_models(arch, tmp_path, monkeypatch, eager_single_thread):
    monkeypatch.setitem(LOCAL_MODELS, "tiny_vgg", TinyVGG)
    ckpt = make_int8_checkpoint(tmp_path / "int8", arch=arch, input_size=16)
    out = tmp_path / "search"
    result = run_search(tiny_config(ckpt, out, episodes=1, finetune_steps=1, top_k=0, search_train_size=32,
                                    ddpg=SMALL_AGENT))
    policy = Policy.load(out / "best_policy.json")
    assert len(policy) == len(prepare(tiny_config(ckpt, tmp_path / "x")).names)
    assert 0 < result.best["latency_ratio"] < 1


def test_evaluator_restores_int8_exactly_and_the_cache_is_exact(int8_ckpt, tmp_path, eager_single_thread):
    config = tiny_config(int8_ckpt, tmp_path)
    search = Search(config, prepare(config), None)
    search.evaluator = search.build_evaluator()
    model = search.evaluator.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    policy = Policy([3, 5, 2, 6], [4, 3, 6, 2], None, search.setup.names)
    first = search.evaluator.evaluate(policy, 2)
    finetuned = {k: v.clone() for k, v in model.state_dict().items()}
    assert [layer.w_bit for _, layer in quantizable_layers(model)] == [3, 5, 2, 6]
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in start.items() if k in model.state_dict())
    search.evaluator.restore()
    after = model.state_dict()
    assert set(after) == set(start) and all(torch.equal(after[k], v) for k, v in start.items())
    assert [layer.w_bit for _, layer in quantizable_layers(model)] == [8] * 4
    # a policy's accuracy does not depend on what ran before it, so the cache by policy is exact
    search.evaluator.evaluate(Policy.uniform(search.setup.names, 2, 2), 2)
    assert search.evaluator.evaluate(policy, 2).accuracy == first.accuracy
    assert all(torch.equal(model.state_dict()[k], v) for k, v in finetuned.items())
    accuracy, t_finetune, t_eval, cached, diverged = search.evaluate(policy, 2)
    assert (accuracy, cached, diverged) == (first.accuracy, False, None)
    assert search.evaluate(policy, 2) == (first.accuracy, 0.0, 0.0, True, None)
