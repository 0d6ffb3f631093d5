"""The route as a value (lib.cim.route): every case of ROUTES takes the route it names and computes
the reference route's outputs and gradients; `choose_route` over a table of plans × layer flags ×
runtimes × inputs keeps its rules; the routes a layer took are counted."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from lib.cim import CIMConv2d, CIMLinear, HardwareConfig, calibrate, crossbar_adc
from lib.cim.crossbar import CrossbarPlan, TileLayout
from lib.cim.layers import route_counts
from lib.cim.noise import attach
from lib.cim.noise_config import preset
from lib.cim.route import InputMeta, LayerFlags, Route, UnsupportedRoute, choose_route
from lib.cim.runtime import RUNTIME, Runtime
from lib.cim.scratch import scratch_buffers
from route_cases import INT8, ROUTES, RouteCase

BASE_HW = dict(rows=32, cols=64, cell_bits=2, adc_bits=6, mapping="differential-column", weight_granularity="column",
               psum_granularity="column", input_mode="multi-bit")
REFERENCE = {"fused_weights": False, "fused_adc": False, "cache_eval": False}


def _layer(case: RouteCase):
    """A calibrated layer of the case and an input: a one-group conv with a ragged last row-tile
    (its node keeps the untiled input), or a linear layer with leading token dims."""
    torch.manual_seed(0)
    hw = HardwareConfig(**{**BASE_HW, **case.hw})
    if case.kind == "conv":
        layer = CIMConv2d(10, 6, 3, padding=1, hw=hw, w_bit=5, a_bit=4, input_signed=case.input_signed)
        x = torch.randn(3, 10, 7, 7)
    else:
        layer = CIMLinear(37, 5, hw=hw, w_bit=5, a_bit=4, input_signed=case.input_signed)
        x = torch.randn(2, 3, 37)
    x = x if case.input_signed else x.abs()
    calibrate(layer, [x])
    return layer, x


def _params(layer):
    return [layer.weight, layer.bias, layer.weight_step_module.step, layer.input_step_module.step,
            layer.psum_adc.step]


def _graph_names(out: torch.Tensor) -> set:
    """Names of every autograd node behind `out`."""
    seen, names, stack = set(), set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _run(layer, x, mode: str, repeatable: bool = True):
    """(outputs, gradients or None, the autograd node names) of one forward in `mode`; an
    evaluation forward of a `repeatable` layer (no read noise) is run twice and must repeat."""
    if mode == "train":
        layer.train()
    else:
        layer.eval()
    torch.manual_seed(11)  # noise-aware training draws its cells from torch's generator
    with scratch_buffers(), torch.set_grad_enabled(mode != "eval"):
        out = layer(x)
        if mode == "eval":
            if repeatable:
                again = layer(x)  # served from what the first forward kept
                assert torch.equal(again, out)
            return out, None, set()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        grads = torch.autograd.grad((out * weights).sum(), _params(layer), allow_unused=True)
        return out.detach(), grads, _graph_names(out)


@pytest.mark.parametrize("case", ROUTES, ids=str)
def test_every_route_takes_its_way_and_the_reference_values(case, monkeypatch):
    if case.large:
        monkeypatch.setattr(crossbar_adc, "PARTIAL_SUM_CHUNK_BYTES", 256)
    layer, x = _layer(case)
    reference, _ = _layer(case)
    reference.load_state_dict(layer.state_dict())
    for name, value in case.attributes.items():
        setattr(layer, name, value)
    for name, value in {**case.attributes, **REFERENCE}.items():
        setattr(reference, name, value)
    if case.noise:  # the same devices on both (an evaluation programming depends on the seed alone)
        for model in (layer, reference):
            assert attach(torch.nn.Sequential(model), preset(case.noise), seed=3) == 1
    layer.route_counts.clear()
    with RUNTIME.use(**case.runtime):
        out, grads, nodes = _run(layer, x, case.mode, not case.noise)
    with RUNTIME.use(integer_products=False, compile="0"):
        want, want_grads, _ = _run(reference, x, case.mode, not case.noise)
    routes = list(layer.route_counts)
    assert len(routes) == 1, routes
    taken = dataclasses.asdict(routes[0])
    assert {key: taken[key] for key in case.expect} == case.expect, routes[0].describe()
    assert ("_CrossbarADCBackward" in nodes) == (taken["conversion"] == "node")
    ref_route = dataclasses.asdict(next(iter(reference.route_counts)))
    assert ref_route["weights"] in ("composed", "fused") and ref_route["conversion"] in ("adc", "none")
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if grads is not None:
        for got, expected in zip(grads, want_grads):
            assert (got is None) == (expected is None)
            if expected is not None:
                assert torch.allclose(got, expected, rtol=1e-3, atol=1e-5 * expected.abs().max().item())


def test_the_routes_taken_are_counted_per_layer():
    case = ROUTES[0]
    layer, x = _layer(case)
    layer.route_counts.clear()
    layer.train()
    for _ in range(2):
        layer(x)
    layer.eval()
    with torch.no_grad():
        layer(x)
    model = torch.nn.Sequential(layer)
    counts = route_counts(model)
    assert list(counts) == ["0"] and [entry["forwards"] for entry in counts["0"]] == [2, 1]
    assert counts["0"][0]["route"].startswith("chain=cim path=crossbar weights=fused")


# ------------------------------------------------------------------------------ the table
def _plan(kind: str, mapping: str, input_mode: str, signed: bool) -> CrossbarPlan:
    hw = HardwareConfig(**{**BASE_HW, "mapping": mapping, "input_mode": input_mode, "input_bits": 2}).simulated()
    layout = TileLayout.for_layer(hw, 1, 10, 6, 9 if kind == "conv" else 1, kind)
    return CrossbarPlan.for_layout(hw, layout, 5, 4, signed)


def _flags(kind: str, **changes) -> LayerFlags:
    base = dict(kind=kind, export_mode=False, weight_export_mode=False, weight_quant_enabled=True, training=True,
                force_crossbar=False, fused_adc=True, fused_weights=True, cache_eval=True, adc_enabled=True,
                adc_fusable=True, adc_lo=-32, adc_hi=31, padding_zeros=True, input_quantized=True,
                plain_input_quant=True, input_step_ready=False, side_requires_grad=True, input_mode="multi-bit",
                device_noise=False)
    return LayerFlags(**{**base, **changes})


def _inputs(**changes) -> InputMeta:
    base = dict(device_type="cpu", dtype_name="float32", element_bytes=4, grad_enabled=True, tracing=False,
                requires_grad=True, large=False)
    return InputMeta(**{**base, **changes})


TABLE = list(itertools.product(
    ("conv", "linear"), ("offset", "differential-column"), ("multi-bit", "bit-serial"), (True, False),  # plan
    ("train", "eval", "eval-grad"), (True, False), (True, False),  # mode, fused_adc, adc enabled
    (Runtime(), Runtime(compile="0", integer_products=False), Runtime(gradient_products="bfloat16")),
    (False, True), (False, True)))  # tracing, large


@pytest.mark.parametrize("kind,mapping,input_mode,signed", sorted({row[:4] for row in TABLE}))
def test_choose_route_keeps_its_rules_over_the_table(kind, mapping, input_mode, signed):
    plan = _plan(kind, mapping, input_mode, signed)
    for *_, mode, fused_adc, adc_on, runtime, tracing, large in (row for row in TABLE
                                                                 if row[:4] == (kind, mapping, input_mode, signed)):
        training, grad = mode == "train", mode != "eval"
        flags = _flags(kind, training=training, fused_adc=fused_adc, adc_enabled=adc_on, adc_fusable=adc_on,
                       input_step_ready=not training, side_requires_grad=grad, input_mode=input_mode)
        inputs = _inputs(grad_enabled=grad, requires_grad=grad, tracing=tracing, large=large)
        route = choose_route(plan, flags, runtime, inputs)
        assert route == choose_route(plan, flags, runtime, inputs)  # pure
        assert route.chain == ("brevitas" if tracing else "cim")
        assert route.path == ("crossbar" if adc_on else "dequantized")
        assert route.executor == ("eager" if runtime.compile == "0" else "direct")
        if training or grad:
            assert route.weights != "cached"
        if route.path == "dequantized":
            assert (route.products, route.conversion, route.chunking) == ("none", "none", "none")
            continue
        if tracing or not runtime.integer_products:
            assert route.products == "float32" and route.input == "float"
        assert route.conversion == (("node" if grad else "no-grad") if fused_adc else "adc")
        assert route.chunking == ("rows" if large and fused_adc else "whole")
        assert (route.backward == "none") == (not grad)
        assert (route.gradient_dtype == "none") == (route.backward == "none")
        if route.gradient_dtype == "bfloat16":
            assert runtime.gradient_products == "bfloat16"
        if route.input == "codes":
            assert (kind, mode, mapping, input_mode) == ("conv", "eval", "differential-column", "multi-bit")
            assert route.products in ("int8", "int8-epilogue") and route.conversion == "no-grad"
        if route.products == "int8-epilogue":
            assert kind == "conv" and not signed and (route.conversion == "no-grad" or route.chunking == "rows")


def test_choose_route_exact_rows():
    """A few full routes, written out."""
    conv = _plan("conv", "differential-column", "multi-bit", True)
    train = choose_route(conv, _flags("conv"), Runtime(), _inputs())
    assert train == Route("cim", "crossbar", "fused", "float", INT8, "node", "whole", "node", "float32", "direct")
    evaluation = choose_route(conv, _flags("conv", training=False, input_step_ready=True, side_requires_grad=False),
                              Runtime(compile="0"), _inputs(grad_enabled=False, requires_grad=False))
    codes = "codes" if INT8 == "int8" else "float"
    assert evaluation == Route("cim", "crossbar", "cached", codes, INT8, "no-grad", "whole", "none", "none", "eager")
    exported = choose_route(conv, _flags("conv", export_mode=True, weight_export_mode=True), Runtime(), _inputs())
    assert (exported.chain, exported.weights) == ("brevitas", "composed")
    off = choose_route(conv, _flags("conv", adc_enabled=False, adc_fusable=False), Runtime(), _inputs())
    assert (off.path, off.backward) == ("dequantized", "autograd")
    with pytest.raises(UnsupportedRoute, match="layer kind 'attention'"):
        choose_route(conv, _flags("attention"), Runtime(), _inputs())
