"""ONNX export of quantizers and the models around them."""

from vqdeploy.export.metadata import ExportInfo, read_metadata
from vqdeploy.export.onnx import export_onnx, find_quantizers

__all__ = ["ExportInfo", "export_onnx", "find_quantizers", "read_metadata"]
