"""Export a trained CIM model to ONNX QCDQ and prove the file reproduces it with onnxruntime.

`export_model` never touches the model it is given: it deep-copies it (a failed Brevitas export
leaves quant proxies in export mode), replaces each CIM layer of the copy by its export form
(lib/export/layers.py), exports that with Brevitas' `export_onnx_qcdq` (TorchScript path, so
int32 biases are allowed), cleans the graph, writes metadata, and runs onnxruntime on real
images against the PyTorch model in eval mode. A failed check raises ExportError and leaves the
graph beside the output as `<name>.rejected.onnx` for inspection, never at the output path.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import onnx
import torch
from torch import nn

from lib.cim import CIMLayerMixin, current_policy, quantizable_layers
from lib.cim.convert import set_submodule
from lib.cim.noise import detach as detach_noise
from lib.export import graph as graph_tools
from lib.export.layers import ExportCIMLayer, ExportFormError, check_calibrated
from lib.fileio import atomic_write
from lib.errors import UserError
from lib.finite import NonFiniteError, require_finite

log = logging.getLogger(__name__)

DEFAULT_OPSET = 13
MIN_AGREEMENT = 0.99
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(UserError, RuntimeError):
    """An export that failed or whose onnxruntime check did not reproduce the PyTorch model."""


@dataclass
class OrtCheck:
    """onnxruntime vs PyTorch (eval) on real images."""

    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    images: int
    passed: bool
    min_agreement: float
    form_max_abs_diff: Optional[float] = None  # onnxruntime vs the PyTorch export form (runtime-only difference)

    def to_dict(self) -> dict:
        return {"ort_top1_agreement": self.top1_agreement, "ort_max_abs_diff": self.max_abs_diff,
                "ort_mean_abs_diff": self.mean_abs_diff, "ort_images": self.images, "ort_passed": self.passed,
                "ort_min_agreement": self.min_agreement, "ort_vs_export_form_max_abs_diff": self.form_max_abs_diff}


@dataclass
class ExportResult:
    path: Path
    check: OrtCheck
    export_seconds: float
    form_max_abs_diff: float
    layers: list = field(default_factory=list)
    graph: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds per phase

    def to_dict(self) -> dict:
        return {"onnx": str(self.path), **self.check.to_dict(), "export_seconds": self.export_seconds,
                "export_form_max_abs_diff": self.form_max_abs_diff, "timings": self.timings, "layers": self.layers,
                "graph": self.graph}


# ------------------------------------------------------------------------------ export form
def build_export_form(model: nn.Module) -> tuple[nn.Module, list]:
    """Replace every CIM layer of `model` IN PLACE by its export form; returns (model, per-layer info).

    Call it on a copy: the result is for export only (eval, fixed steps). Biases become int32 at
    input step × weight step, so the form differs from the float-bias CIM layer by at most half
    that step per bias (onnxruntime's fused integer kernels quantize biases that way anyway).
    """
    layers = quantizable_layers(model)
    if not layers:
        raise ExportFormError(f"{type(model).__name__} has no CIM layers: nothing quantized to export")
    infos = []
    for name, layer in layers:
        form = ExportCIMLayer(name, layer)
        set_submodule(model, name, form)
        infos.append(form.info().to_dict())
    return model.eval(), infos


def model_metadata(model: nn.Module, input_size: Optional[int] = None) -> dict:
    """Policy, hardware and (when the cost model can trace the model) latency of a CIM model."""
    layers = quantizable_layers(model)
    policy = current_policy(model)
    hardware = [layer.hw.to_dict() for _, layer in layers]
    meta: dict[str, Any] = {"policy": policy.to_json_dict(),
                            "hardware": hardware[0] if all(h == hardware[0] for h in hardware) else
                            {name: h for (name, _), h in zip(layers, hardware)}}
    if input_size is not None:
        try:
            from lib.simulator import CostModel

            max_bit = max([8] + policy.w_bits + policy.a_bits)
            cost = CostModel.from_model(model, layers[0][1].hw, input_size, max_bit=max_bit).policy_cost(policy)
            meta.update(latency_us=cost.total_latency, baseline_latency_us=cost.baseline_latency,
                        latency_ratio=cost.ratio, baseline_bits=list(cost.baseline_bits), arrays=cost.arrays,
                        adc_conversions=cost.adc_conversions)
        except Exception as err:  # noqa: BLE001 - metadata must not block an export
            log.warning("no latency in the ONNX metadata: the cost model failed (%s)", err)
    return meta


# ------------------------------------------------------------------------------ export
def _brevitas_export(form: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """Brevitas QCDQ export of the export form (TorchScript path: the one whose handlers export int32 biases)."""
    import tempfile

    with warnings.catch_warnings():
        # Brevitas' export imports its graph equalisation, which warns that an optional kernel
        # package (fast_hadamard_transform) is missing: the export uses none of its kernels
        warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
        from brevitas.export import export_onnx_qcdq

    with tempfile.TemporaryDirectory(prefix="cim_export_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "raw.onnx"
        export_onnx_qcdq(form, args=example, export_path=str(path), dynamo=False, opset_version=opset,
                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                  keep_initializers_as_inputs=False)
        return onnx.load(str(path))


def ort_logits(model_bytes: bytes, images: torch.Tensor, batch_size: int = 64, threads: int = 0) -> np.ndarray:
    """Run the ONNX model with onnxruntime (CPU) over `images` in chunks."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    outputs = [session.run(None, {INPUT_NAME: chunk.numpy()})[0]
               for chunk in images.detach().cpu().float().split(batch_size)]
    return np.concatenate(outputs)


def compare_logits(reference: torch.Tensor, ort_out: np.ndarray, min_agreement: float = MIN_AGREEMENT) -> OrtCheck:
    ref = reference.detach().cpu().numpy()
    diff = np.abs(ref - ort_out)
    agreement = float((ref.argmax(1) == ort_out.argmax(1)).mean())
    return OrtCheck(top1_agreement=agreement, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                    images=int(ref.shape[0]), passed=agreement >= min_agreement, min_agreement=min_agreement)


def export_model(model: nn.Module, output: str | Path, images: torch.Tensor, *,
                 metadata: Optional[Mapping[str, Any]] = None, opset: int = DEFAULT_OPSET,
                 min_agreement: float = MIN_AGREEMENT, example_batch: int = 2) -> ExportResult:
    """Export `model` (a CIM model; left untouched) to `output` and validate it on `images`.

    images: a batch of real (preprocessed) validation images, also used for the onnxruntime check.
    metadata: extra metadata_props (e.g. accuracy); policy, hardware and latency are added here.
    Raises ExportError when the export fails or onnxruntime disagrees with PyTorch.
    """
    output = Path(output)
    if images.dim() != 4 or images.shape[0] < 1:
        raise ExportError(f"images must be a (N, C, H, W) batch of validation images, got shape {tuple(images.shape)}")
    started = time.time()
    if not any(isinstance(m, CIMLayerMixin) for m in model.modules()):
        raise ExportError(f"{type(model).__name__} has no CIM layers: nothing quantized to export "
                          f"(convert it with lib.cim.quantize_model and train/calibrate it first)")
    try:
        require_finite(model.state_dict(), f"the {type(model).__name__} to export")
    except NonFiniteError as err:
        raise ExportError(f"{err}: integer codes of NaN/inf mean nothing") from None
    try:  # before any forward pass: an uncalibrated step would initialise itself from this data
        for name, layer in model.named_modules():  # (no tracing: that would run the model)
            if isinstance(layer, CIMLayerMixin):
                check_calibrated(name, layer)
    except ExportFormError as err:
        raise ExportError(str(err)) from err
    timings: dict[str, float] = {}
    clock = [time.time()]

    def lap(name: str) -> None:
        now = time.time()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    work = copy.deepcopy(model).cpu().eval()  # everything below mutates only this copy
    if detach_noise(work):  # the graph holds the model, not one programmed chip: checked against the ideal cells
        log.info("device noise attached to the model is not exported: the graph and its check use the ideal cells")
    images = images.detach().cpu().float()
    try:
        with torch.no_grad():
            reference = work(images)
        lap("copy_and_reference")
        meta = {"producer": "cim-aq lib.export", "export_form": "per-tile/per-slice QCDQ (see docs/export.md)",
                **model_metadata(work, tuple(images.shape[1:])), **dict(metadata or {})}
        lap("metadata")
        form, infos = build_export_form(work)
        with torch.no_grad():
            form_logits = form(images)
        form_diff = float((form_logits - reference).abs().max())
        log.info("export form vs CIM model (PyTorch): max |Δlogit| %.3g", form_diff)
        lap("export_form")
        raw = _brevitas_export(form, images[:example_batch], opset)
        lap("brevitas_export")
    except ExportFormError as err:
        raise ExportError(str(err)) from err
    except Exception as err:
        raise ExportError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    model_proto = graph_tools.clean(raw)
    graph_tools.set_metadata(model_proto, meta)
    try:
        graph_tools.check(model_proto)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"exported graph fails onnx.checker: {err}") from err
    lap("clean_and_check")
    export_seconds = time.time() - started
    model_bytes = model_proto.SerializeToString()
    try:
        ort_out = ort_logits(model_bytes, images)
        check = compare_logits(reference, ort_out, min_agreement)
        check.form_max_abs_diff = float(np.abs(form_logits.numpy() - ort_out).max())
        lap("onnxruntime_check")
    except Exception as err:  # onnxruntime refuses an invalid graph only when it runs it
        _write_rejected(output, model_bytes)
        raise ExportError(f"onnxruntime cannot run the exported graph: {type(err).__name__}: {err}") from err
    if not check.passed:
        _write_rejected(output, model_bytes)
        raise ExportError(f"onnxruntime disagrees with PyTorch: top-1 agreement {check.top1_agreement:.4f} < "
                          f"{min_agreement} (max |Δlogit| {check.max_abs_diff:.3g}; vs the export form in PyTorch "
                          f"{check.form_max_abs_diff:.3g}, export form vs model {form_diff:.3g}) on {check.images} images")
    graph_tools.set_metadata(model_proto, {"ort_top1_agreement": check.top1_agreement,
                                           "ort_max_abs_diff": check.max_abs_diff})
    atomic_write(output, lambda handle: handle.write(model_proto.SerializeToString()), binary=True)
    log.info("exported %s: %d nodes, onnxruntime top-1 agreement %.4f, max |Δlogit| %.3g (%d images), %.1f s",
             output, len(model_proto.graph.node), check.top1_agreement, check.max_abs_diff, check.images,
             export_seconds)
    return ExportResult(path=output, check=check, export_seconds=export_seconds, form_max_abs_diff=form_diff,
                        layers=infos, graph=graph_tools.qdq_summary(model_proto), metadata=meta, timings=timings)


def _write_rejected(output: Path, model_bytes: bytes) -> None:
    rejected = output.with_name(output.stem + ".rejected.onnx")
    atomic_write(rejected, lambda handle: handle.write(model_bytes), binary=True)
    log.error("the graph that failed validation is at %s", rejected)
