"""Per-layer sensitivity of the INT8 model to lower bits, the integer program's objective.

For every quantizable layer and every searched bit width of its weights, its inputs (and its
ADC), measured on a few fixed batches of the search-train split with the CIM layers' own
quantizers (bit slicing, the input grid and the ADC as the crossbar computes them):

measured  the loss increase when only that layer's weights (or inputs, or ADC) are set to those
          bits (its changed steps recalibrated as the search's evaluations do, on its own recorded
          inputs), against the INT8 loss. Cost: per measured candidate, calibration_batches
          single-layer forwards + batches forward passes (every other layer's crossbar form
          stays cached).
kl        the same single-layer changes, scored by the output distortion instead of the loss:
          the mean KL divergence of the changed model's softmax from the INT8 model's (ZeroQ's
          sensitivity). It needs no labels, is positive for any change that moves the outputs
          (a loss increase is 0 or negative for many mild changes of a well-fitted model, so those
          look free), and to second order it is a quadratic form of the output perturbation, which
          is what makes per-layer scores add. Same cost as measured.
hessian   HAWQ's score: the average Hessian trace of the loss over that layer's weights (or its
          inputs) × ‖Q(x) − x‖² at those bits. The CIM layers' straight-through gradients have no
          second derivative, so the trace is Hutchinson's estimate with finite-difference
          Hessian-vector products, Hv ≈ (g(x + εv) − g(x − εv)) / 2ε, every layer's weights and
          inputs perturbed at once by their own Rademacher v. Cost: probes × batches × 2 forward
          and backward passes for every layer together, plus one single-layer forward per input
          candidate; ADC bits are scored by the measurement (their error is not in x).

Both measurements can also be taken around a policy (`context`): every other layer at that
policy's bits, the measured layer changed from its INT8 state. Scores measured around the solved
policy see how layers interact (lowering several layers of one stage costs more than the sum of
lowering each alone), which scores measured at INT8 cannot (lib.search.refine).

A candidate (w, a[, adc]) scores the sum of its decisions' scores; the INT8 bits score 0 and a
measured increase below the INT8 loss counts as none. Each decision's scores are then made
monotone (a width scores at least what any wider one does): a few batches' noise must not make
a narrower width look safer than a wider one. Scores are taken in the search's input mode. Results are cached as JSON under a key of
the checkpoint's bytes, the hardware, the split, the bit space and the method, so a second run and
a Pareto sweep reuse them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lib.cim import apply_policy, calibrate, quantizable_layers
from lib.fileio import atomic_write_json
from lib.policy import Policy
from lib.search.downstream import DownstreamForward
from lib.search.evaluator import PolicyEvaluator
from lib.search.free import HeldDecisions
from lib.search.space import ADC, INPUT, WEIGHT, BitSpace
from lib.training import seed_epoch

log = logging.getLogger(__name__)

FORMAT = "cim-aq/sensitivity-3"
# Finite-difference step of the Hessian-vector products, relative to each tensor's RMS.
FD_RELATIVE_STEP = 1e-2


@dataclass
class Sensitivities:
    """Scores per layer and decision: scores[layer][decision][bits] (only the searched bits)."""

    method: str
    scores: list
    seconds: float = 0.0
    passes: dict = field(default_factory=dict)
    cached: bool = False
    rounds: int = 1

    def of(self, layer: int, w_bit: int, a_bit: int, adc_bits: Optional[int] = None) -> float:
        """A candidate's score: the sum of its decisions' scores (0 at the INT8 bits and held decisions)."""
        row = self.scores[layer]
        total = row[WEIGHT].get(w_bit, 0.0) + row[INPUT].get(a_bit, 0.0)
        if adc_bits is not None:
            total += row[ADC].get(adc_bits, 0.0)
        return total

    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method, "seconds": round(self.seconds, 3), "passes": self.passes,
                "rounds": self.rounds,
                "scores": [{d: {str(b): v for b, v in row[d].items()} for d in (WEIGHT, INPUT, ADC)}
                           for row in self.scores]}

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivities":
        scores = [{d: {int(b): float(v) for b, v in row[d].items()} for d in (WEIGHT, INPUT, ADC)}
                  for row in data["scores"]]
        return cls(data["method"], scores, float(data.get("seconds", 0.0)), dict(data.get("passes", {})),
                   cached=True, rounds=int(data.get("rounds", 1)))


def cache_key(checkpoint: Path, fields: dict) -> str:
    """A hash of the checkpoint's bytes and every setting the scores depend on."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def fixed_batches(evaluator: PolicyEvaluator, count: int) -> list:
    """The first `count` batches of the search-train split in the evaluator's seeded order."""
    seed_epoch(evaluator.seed, 0, evaluator.train_loader, evaluator.dist.rank)
    return [(x.to(evaluator.device), y.to(evaluator.device))
            for x, y in itertools.islice(iter(evaluator.train_loader), count)]


def searched_bits(space: BitSpace, held: HeldDecisions, layer: int, decision: str) -> tuple:
    """The bits to score for one decision: its allowed ones below the start, none where held or forced."""
    if decision != ADC and space.is_forced(layer, decision):
        return ()
    if (layer, decision) in held:
        return ()
    return tuple(space.choices(decision))


def measure(evaluator: PolicyEvaluator, space: BitSpace, held: HeldDecisions, batches: list,
            decisions: tuple = (WEIGHT, INPUT, ADC), metric: str = "loss",
            context: Optional[Policy] = None) -> tuple[list, dict]:
    """Loss increase (metric "loss") or output KL divergence (metric "kl") per (layer, decision, bits)
    with only that decision changed (see module docstring).

    Only the changed layer moves: it is recalibrated alone on its recorded INT8-start inputs (what
    a whole-model calibration would give it, the other layers being unchanged) and restored from
    its own state after, so every other layer keeps its cached crossbar form between candidates;
    each trial forward re-runs only what the layer reaches (lib.search.downstream) where the
    model traces. A "forward" pass counted here is then such a partial one.
    context: every other layer at this policy's bits (calibrated once, as an episode calibrates),
    the measured layer taken from its INT8 state; its inputs are recorded in that context."""
    model, criterion = evaluator.model, evaluator.criterion
    evaluator.restore()
    layers = [layer for _, layer in quantizable_layers(model)]
    if metric not in ("loss", "kl"):
        raise ValueError(f"metric {metric!r}: expected 'loss' or 'kl'")
    base_logits = _logits(model, batches)
    base = (float(sum(criterion(z, y).item() for z, (_, y) in zip(base_logits, batches)) / len(batches))
            if metric == "loss" else 0.0)
    start_states = [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in layers]
    if context is not None:
        apply_policy(model, context)
        seed_epoch(evaluator.seed, 0, evaluator.train_loader, evaluator.dist.rank)
        calibrate(model, evaluator.train_loader, max_batches=evaluator.calibration_batches, batch_norm="running")
    inputs = _layer_inputs(model, layers, batches)
    downstream = DownstreamForward.build(model, layers, batches)
    scores = [{WEIGHT: {}, INPUT: {}, ADC: {}} for _ in layers]
    forwards, single = (2 + (downstream is not None)) * len(batches), 0

    @torch.no_grad()
    def score_after_change(i: int) -> float:
        if downstream is None:
            model.eval()
            logits = [model(x) for x, _ in batches]
        else:
            logits = [downstream.logits(i, b) for b in range(len(batches))]
        if metric == "kl":
            return float(sum(_kl(z0, z) for z0, z in zip(base_logits, logits)) / len(batches))
        return float(sum(criterion(z, y).item() for z, (_, y) in zip(logits, batches)) / len(batches))
    for i, layer in enumerate(layers):
        own_state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict(start_states[i])  # its INT8 bits and steps (a no-op without a context)
        w, a, adc = layer.w_bit, layer.a_bit, layer.adc_bits
        for decision in decisions:
            if decision == ADC and space.adc_bits is None:
                continue
            searched = searched_bits(space, held, i, decision)
            if not searched:
                continue
            # The reference: the start bits with the same steps re-initialised, so a score holds
            # the bits' own damage and not the step re-initialisation's, which finetuning undoes.
            layer.mark_steps_stale(weight=decision == WEIGHT)
            single += _calibrate_layer(layer, inputs[i][:evaluator.calibration_batches])
            reference = max(score_after_change(i), base)
            forwards += len(batches)
            layer.load_state_dict(start_states[i])
            for bits in searched:
                trial = {WEIGHT: (bits, a, None), INPUT: (w, bits, None), ADC: (w, a, bits)}[decision]
                if trial == (w, a, None) or (decision == ADC and bits == adc):
                    scores[i][decision][bits] = 0.0
                    continue
                layer.set_bits(*trial)
                single += _calibrate_layer(layer, inputs[i][:evaluator.calibration_batches])
                scores[i][decision][bits] = max(score_after_change(i) - reference, 0.0)
                forwards += len(batches)
                layer.load_state_dict(start_states[i])  # its start bits and steps again
        layer.load_state_dict(own_state)
    evaluator.restore()
    return scores, {"forward": forwards, "backward": 0, "single_layer_forward": single}


@torch.no_grad()
def _logits(model: nn.Module, batches: list) -> list:
    model.eval()
    return [model(x) for x, _ in batches]


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over the batch of KL(softmax(reference) || softmax(logits))."""
    target = torch.log_softmax(reference.double(), dim=1)
    return float(torch.nn.functional.kl_div(torch.log_softmax(logits.double(), dim=1), target,
                                            reduction="batchmean", log_target=True))


@torch.no_grad()
def _calibrate_layer(layer: nn.Module, inputs: list) -> int:
    """Set one layer's stale steps from its recorded inputs, in train mode as `calibrate` does
    (BatchNorm is outside the layer: its inputs were recorded with the running statistics)."""
    layer.train()
    try:
        for x in inputs:
            layer(x)
    finally:
        layer.eval()
    return len(inputs)


def _rademacher(shape, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=torch.float32)


def hessian_traces(evaluator: PolicyEvaluator, batches: list, probes: int, seed: int) -> tuple[list, list, dict]:
    """(average Hessian trace over each layer's weights, over its inputs, passes) by finite-difference
    Hutchinson (see module docstring)."""
    model, criterion = evaluator.model, evaluator.criterion
    evaluator.restore()
    model.eval()
    layers = [layer for _, layer in quantizable_layers(model)]
    n = len(layers)
    weight_trace, input_trace = [0.0] * n, [0.0] * n
    generator = torch.Generator().manual_seed(seed)
    passes = 0
    for _ in range(probes):
        for x, y in batches:
            v_w = [_rademacher(l.weight.shape, generator, l.weight.device) for l in layers]
            eps_w = [FD_RELATIVE_STEP * float(l.weight.detach().pow(2).mean().sqrt()) + 1e-12 for l in layers]
            v_in: list = [None] * n
            eps_in: list = [None] * n
            grads = []
            for sign in (1.0, -1.0):
                captured: list = [None] * n
                hooks = []
                for i, layer in enumerate(layers):
                    hooks.append(layer.register_forward_pre_hook(
                        _perturb_input(i, sign, v_in, eps_in, captured, generator)))
                originals = [l.weight.detach().clone() for l in layers]
                try:
                    with torch.no_grad():
                        for layer, v, eps in zip(layers, v_w, eps_w):
                            layer.weight.add_(sign * eps * v)
                    model.zero_grad(set_to_none=True)
                    loss = criterion(model(x), y)
                    loss.backward()
                    passes += 1
                    grads.append(([l.weight.grad.detach().clone() if l.weight.grad is not None else
                                   torch.zeros_like(l.weight) for l in layers],
                                  [c.grad.detach().clone() if c is not None and c.grad is not None else None
                                   for c in captured]))
                finally:
                    for hook in hooks:
                        hook.remove()
                    with torch.no_grad():
                        for layer, original in zip(layers, originals):
                            layer.weight.copy_(original)
            (gw_plus, gx_plus), (gw_minus, gx_minus) = grads
            for i in range(n):
                hv = (gw_plus[i] - gw_minus[i]) / (2 * eps_w[i])
                weight_trace[i] += float((v_w[i] * hv).sum()) / v_w[i].numel()
                if gx_plus[i] is not None and gx_minus[i] is not None:
                    hv = (gx_plus[i] - gx_minus[i]) / (2 * eps_in[i])
                    input_trace[i] += float((v_in[i] * hv).sum()) / v_in[i].numel()
    model.zero_grad(set_to_none=True)
    evaluator.restore()
    count = probes * len(batches)
    return ([t / count for t in weight_trace], [t / count for t in input_trace],
            {"forward": passes, "backward": passes})


def _perturb_input(i: int, sign: float, v_in: list, eps_in: list, captured: list, generator: torch.Generator):
    """A pre-hook moving layer i's input by sign·ε·v (v drawn on the + pass) and keeping it for its gradient."""
    def hook(module, args):
        x = args[0]
        if v_in[i] is None:
            v_in[i] = _rademacher(x.shape, generator, x.device)
            eps_in[i] = FD_RELATIVE_STEP * float(x.detach().pow(2).mean().sqrt()) + 1e-12
        moved = x + sign * eps_in[i] * v_in[i]
        if not moved.requires_grad:
            moved = moved.detach().requires_grad_(True)
        moved.retain_grad()
        captured[i] = moved
        return (moved, *args[1:])
    return hook


def hessian_scores(evaluator: PolicyEvaluator, space: BitSpace, held: HeldDecisions, batches: list, probes: int,
                   seed: int) -> tuple[list, dict]:
    """HAWQ's trace × perturbation per weight and input candidate; the ADC's by measurement."""
    weight_trace, input_trace, passes = hessian_traces(evaluator, batches, probes, seed)
    model = evaluator.model
    evaluator.restore()
    layers = [layer for _, layer in quantizable_layers(model)]
    inputs = _layer_inputs(model, layers, batches)
    start = [(l.w_bit, l.a_bit) for l in layers]
    scores = [{WEIGHT: {}, INPUT: {}, ADC: {}} for _ in layers]
    single = 0
    for i, layer in enumerate(layers):
        for bits in searched_bits(space, held, i, WEIGHT):
            evaluator.restore()
            layer.set_bits(bits, start[i][1])
            with torch.no_grad():
                error = float((layer.quant_weight().value - layer.weight).pow(2).sum())
            scores[i][WEIGHT][bits] = 0.0 if bits == start[i][0] else max(weight_trace[i], 0.0) * error
        for bits in searched_bits(space, held, i, INPUT):
            evaluator.restore()
            layer.set_bits(start[i][0], bits)
            _calibrate_layer(layer, inputs[i][:evaluator.calibration_batches])  # the changed input step
            with torch.no_grad():
                error = 0.0
                for x in inputs[i]:
                    q = layer.input_quant(x)
                    error += float((getattr(q, "value", q) - x).pow(2).sum())
                    single += 1
            scores[i][INPUT][bits] = 0.0 if bits == start[i][1] else max(input_trace[i], 0.0) * error / len(inputs[i])
    evaluator.restore()
    if space.adc_bits is not None:
        measured, more = measure(evaluator, space, held, batches, decisions=(ADC,))
        for row, extra in zip(scores, measured):
            row[ADC] = extra[ADC]
        passes = {"forward": passes["forward"] + more["forward"], "backward": passes["backward"]}
        single += more["single_layer_forward"]
    return scores, {**passes, "single_layer_forward": single}


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: list, batches: list) -> list:
    """Each layer's input tensors on `batches` at the INT8 start (one forward per batch)."""
    model.eval()
    seen: list = [[] for _ in layers]
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach()))
             for i, layer in enumerate(layers)]
    try:
        for x, _ in batches:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def compute_sensitivities(evaluator: PolicyEvaluator, space: BitSpace, held: HeldDecisions, method: str,
                          batches: int, probes: int, seed: int, context: Optional[Policy] = None) -> Sensitivities:
    """Score every searched decision's bits on `batches` fixed search-train batches (see module docstring).

    context: measure each layer with every other layer at this policy's bits (calibrated as an
    episode's), not at INT8: the layer's change is then scored against itself at INT8 in that
    context (measured and kl only)."""
    started = time.perf_counter()
    fixed = fixed_batches(evaluator, batches)
    generator_state = torch.random.get_rng_state()
    try:
        if method in ("measured", "kl"):
            scores, passes = measure(evaluator, space, held, fixed, metric="loss" if method == "measured" else "kl",
                                     context=context)
        elif context is not None:
            raise ValueError(f"sensitivity {method!r} cannot be measured around a policy; expected measured or kl")
        else:
            scores, passes = hessian_scores(evaluator, space, held, fixed, probes, seed)
    finally:
        torch.random.set_rng_state(generator_state)
    scores = [{decision: monotone(row[decision]) for decision in row} for row in scores]
    seconds = time.perf_counter() - started
    log.info("sensitivity (%s): %d layers in %.1f s (%s)", method, len(scores), seconds,
             ", ".join(f"{k} {v}" for k, v in passes.items()))
    return Sensitivities(method, scores, seconds, passes)


def monotone(scores: dict) -> dict:
    """{bits: score} with every score raised to the largest score of any wider width."""
    out, running = {}, 0.0
    for bits in sorted(scores, reverse=True):
        running = max(running, scores[bits])
        out[bits] = running
    return out


def load_or_compute(path: Path, compute) -> Sensitivities:
    """The cached scores at `path`, else `compute()`'s, written there atomically."""
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") == FORMAT:
                found = Sensitivities.from_dict(data)
                log.info("sensitivity: reusing %s", path)
                return found
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("sensitivity cache %s is unreadable; computing again", path)
    result = compute()
    atomic_write_json(path, result.to_dict())
    return result
