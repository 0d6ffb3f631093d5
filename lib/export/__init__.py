"""ONNX QCDQ export of CIM models with an onnxruntime check (`python -m lib.export --help`).

`export_model(model, output, images)` exports a deep copy of a trained CIM model and validates
the file against the PyTorch model on real images; `build_export_form` gives the plain-module
form that the export traces (see README, "ONNX export").
"""
from lib.export.exporter import (DEFAULT_OPSET, MIN_AGREEMENT, ExportError, ExportResult, OrtCheck,
                                 build_export_form, compare_logits, export_model, model_metadata, ort_logits)
from lib.export.graph import QDQNode, layer_qdq, qdq_nodes, qdq_summary
from lib.export.layers import ExportCIMLayer, ExportFormError

__all__ = ["DEFAULT_OPSET", "MIN_AGREEMENT", "ExportError", "ExportResult", "OrtCheck", "build_export_form",
           "compare_logits", "export_model", "model_metadata", "ort_logits", "QDQNode", "layer_qdq", "qdq_nodes", "qdq_summary",
           "ExportCIMLayer", "ExportFormError"]
