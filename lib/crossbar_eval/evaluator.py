"""Evaluating one sweep point: the base model moved onto the point's hardware and bits, only what
the change requires recalibrated on fixed training batches, then scored on the test split once
(ideal) or once per noise repeat (seeded programmings of the devices).

The base is the checkpoint's quantized model, or an FP32 checkpoint quantized post-training
(steps calibrated on training batches, no gradient step). A point model is built at its own
hardware and bits and takes every base tensor that still fits: the weights, BatchNorm and, where
shapes and bits allow, the LSQ weight and input steps. ADC steps are kept only when the point's
crossbar is the base's (what it computes: cells, ADC, mapping, inputs, tiling); otherwise they,
and any step whose bits changed, re-initialise from the calibration batches. Batch statistics
are never touched, and the test split never calibrates anything.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lib.cim import noise as cim_noise
from lib.cim.convert import apply_policy, calibrate, current_policy, quantizable_layers
from lib.cim.hardware import HardwareConfig
from lib.crossbar_eval.grid import Setting, SweepError
from lib.errors import UserError
from lib.model_spec import BASELINE_BITS, ModelSpec, build_model, check_policy, cost_model_for
from lib.policy import Policy
from lib.simulator import CostModel
from lib.training import evaluate

log = logging.getLogger(__name__)

ADC_PREFIX = "psum_adc."


@dataclass(frozen=True)
class PointResult:
    """Test accuracy per repeat, the point's cost, and how it was measured."""

    top1: tuple
    noise: str
    cost: dict
    recalibrated: int
    seconds: float


class PointEvaluator:
    """Scores settings of one base model; keeps the last calibrated point model for the next
    point of the same structure (points that differ only in noise)."""

    def __init__(self, spec: ModelSpec, base_model: nn.Module, calibration: list, test_loader,
                 device: torch.device, seed: int = 0, max_batches: Optional[int] = None,
                 progress: bool = False) -> None:
        self.spec = spec
        self.base_hw = spec.hardware
        self.base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        self.base_policy = current_policy(base_model)
        self.base_structure = Setting(self.base_hw, self.base_policy, None).structure()
        self.calibration = calibration
        self.test_loader = test_loader
        self.device = device
        self.seed = int(seed)
        self.max_batches = max_batches
        self.progress = progress
        self._kept: Optional[tuple] = None  # (structure, model, recalibrated layers)
        self._costs: dict = {}
        self._dims = cost_model_for(spec, self.base_hw).layer_dims  # traced once: the hardware only prices them

    # ------------------------------------------------------------ cost
    @staticmethod
    def check(spec: ModelSpec, setting: Setting) -> None:
        """Refuse a setting whose bits do not fit the model or whose kernels do not fit an array."""
        try:
            check_policy(setting.policy, spec, setting.hardware)
            for dims in cost_model_for(spec, setting.hardware).layer_dims:
                setting.hardware.check_kernel_fits(dims.kernel_elems or 1, dims.name)
        except UserError as err:
            raise SweepError(f"sweep point on {setting.hardware.to_dict()}: {err}") from None

    def cost(self, setting: Setting) -> dict:
        """Latency (µs and ratio to uniform 8/8 on the same hardware), energy where priced, arrays."""
        key = (setting.hardware, tuple(setting.policy.w_bits), tuple(setting.policy.a_bits),
               tuple(setting.policy.adc_bits or ()), setting.hardware.energy)
        if key not in self._costs:
            max_bit = max([8] + setting.policy.w_bits + setting.policy.a_bits)
            model = CostModel(setting.hardware, self._dims, max_bit=max_bit, baseline_bits=BASELINE_BITS)
            cost = model.policy_cost(setting.policy)
            summary = cost.summary()
            self._costs[key] = {"latency_us": cost.total_latency, "latency_ratio": cost.ratio,
                                "energy_pj": summary["energy_pj"], "energy_ratio": summary["energy_ratio"],
                                "arrays": cost.arrays}
        return self._costs[key]

    # ------------------------------------------------------------ models
    def model_for(self, setting: Setting) -> tuple[nn.Module, int]:
        """The calibrated point model (ideal: no noise attached) and how many layers recalibrated."""
        structure = setting.structure()
        if self._kept is not None and self._kept[0] == structure:
            return self._kept[1], self._kept[2]
        if self._kept is not None and _same_but_adc_bits(self._kept[0], structure):
            # only the ADC resolution differs: the kept model's layers take the new bits and
            # re-initialise their ADC steps (what a rebuild would recalibrate, without the rebuild)
            model = self._kept[1]
            apply_policy(model, _with_adc(setting))
            return self._keep(structure, model)
        self._kept = None
        spec = self.spec.at_policy(setting.policy, setting.hardware)
        try:
            model = build_model(spec).to(self.device)
        except UserError as err:  # a hardware the layers refuse (a kernel larger than an array, ...)
            raise SweepError(f"hardware {setting.hardware.to_dict()}: {err}") from None
        own = model.state_dict()
        if structure[0] == self.base_structure[0]:  # the base's crossbar: every tensor fits at the base's bits
            state = {k: v for k, v in self.base_state.items() if k in own}
        else:  # another crossbar: ADC steps re-initialise, other steps stay where their shapes still fit
            state = {k: v for k, v in self.base_state.items() if k in own and ADC_PREFIX not in k
                     and (own[k].shape == v.shape or k.endswith(".bits"))}
        # the base's bits load first (they size the ADC), the point's bits are applied after
        model.load_state_dict(state, strict=False)
        apply_policy(model, setting.policy)
        for _, layer in quantizable_layers(model):
            layer.fused_weights = False  # evaluated only: Brevitas' weight, no training kernels to compile
        return self._keep(structure, model)

    def _keep(self, structure: tuple, model: nn.Module) -> tuple[nn.Module, int]:
        """Recalibrate the layers whose steps are stale (on the fixed training batches), keep the
        model for the next point of the same structure; (model, layers recalibrated)."""
        stale = sum(not layer.is_calibrated for _, layer in quantizable_layers(model))
        if stale:
            calibrate(model, self.calibration, max_batches=len(self.calibration), batch_norm="running")
        model.eval()
        self._kept = (structure, model, stale)
        return model, stale

    # ------------------------------------------------------------ scoring
    def run(self, setting: Setting, repeats: int) -> PointResult:
        started = time.time()
        cost = self.cost(setting)
        model, recalibrated = self.model_for(setting)
        scores = []
        runs = repeats if setting.noise is not None else 1
        try:
            for repeat in range(runs):
                cim_noise.attach(model, setting.noise, seed=self.seed + repeat)
                with torch.no_grad():
                    metrics = evaluate(model, self.test_loader, None, self.device, max_batches=self.max_batches,
                                       progress=False)
                scores.append(float(metrics["top1"]))
        finally:
            cim_noise.detach(model)
        label = setting.noise.describe() if setting.noise is not None else "ideal"
        return PointResult(tuple(scores), label, cost, recalibrated, time.time() - started)


def _same_but_adc_bits(a: tuple, b: tuple) -> bool:
    """Whether two structures (`Setting.structure`) differ at most in the ADC bits."""
    hw_a, hw_b = a[0], b[0]
    return (a[1:3] == b[1:3] and dataclasses.replace(hw_a, adc_bits=hw_b.adc_bits) == hw_b)


def _with_adc(setting: Setting) -> Policy:
    """The setting's policy with every layer's ADC bits spelt out (the hardware default where unset)."""
    policy = setting.policy
    adc = policy.adc_bits if policy.adc_bits is not None else [setting.hardware.adc_bits] * len(policy)
    return Policy(policy.w_bits, policy.a_bits, adc, policy.layer_names)


def post_training_model(spec: ModelSpec, float_state: dict, calibration: list, device) -> nn.Module:
    """An FP32 model quantized post-training to spec's bits on spec's hardware: every step
    calibrated on the training batches (BatchNorm as evaluated), no gradient step."""
    model = build_model(spec, weights=float_state).to(device)
    calibrate(model, calibration, max_batches=len(calibration), batch_norm="running")
    return model.eval()


def base_hardware_of(hw: HardwareConfig) -> HardwareConfig:
    """The base hardware without its noise (noise is a sweep dimension, applied per point)."""
    return dataclasses.replace(hw, noise=None)
