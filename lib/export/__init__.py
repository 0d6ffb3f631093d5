"""ONNX QCDQ export of CIM models with an onnxruntime check (`python -m lib.export --help`).

`export_model(model, output, images)` exports a deep copy of a trained CIM model and validates
the file against the PyTorch model on real images; `build_export_form` gives the plain-module
form that the export traces (docs/export.md).
"""
from lib.lazy_names import lazy_names

# names load on first use: `python -m lib.export --help` answers before torch and onnx load
__getattr__, __all__ = lazy_names(__name__, {
    "lib.export.exporter": ("DEFAULT_OPSET", "MIN_AGREEMENT", "ExportError", "ExportResult", "OrtCheck",
                            "build_export_form", "compare_logits", "export_model", "model_metadata", "ort_logits"),
    "lib.export.graph": ("QDQNode", "layer_qdq", "qdq_nodes", "qdq_summary"),
    "lib.export.layers": ("ExportCIMLayer", "ExportFormError"),
})
