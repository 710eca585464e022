"""ONNX Runtime backend: CPU execution provider, and the CUDA one where onnxruntime-gpu is installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqdeploy.errors import BackendNotAvailableError, DeviceNotAvailableError

_ORT_FLOAT = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendNotAvailableError(
            "the 'ort' backend needs ONNX Runtime: pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"
        ) from error
    return onnxruntime


def providers_for(device: str, precision: str) -> list[Any]:
    """Execution providers for `device`; exact precision turns TF32 off on CUDA (DESIGN.md section 4)."""
    ort = _import_onnxruntime()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendNotAvailableError(
            "Could not find the ONNX Runtime CUDA execution provider. Requested provider was: "
            f"CUDAExecutionProvider, but available providers are: {available}. pip install onnxruntime-gpu"
        )
    if not torch.cuda.is_available():
        raise DeviceNotAvailableError("device='cuda' was asked for, but torch sees no CUDA device")
    index = torch.device(device).index or 0
    options = {"device_id": index, "use_tf32": 0 if precision == "exact" else 1}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class OnnxRuntimeRunner:
    """Runs an exported graph in one InferenceSession (thread-safe: ORT allows concurrent run calls)."""

    name = "ort"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        precision: str = "exact",
        intra_op_num_threads: int | None = None,
        inter_op_num_threads: int | None = None,
    ):
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        if inter_op_num_threads is not None:
            options.inter_op_num_threads = inter_op_num_threads
        self.device = device
        self.session = ort.InferenceSession(str(Path(path)), options, providers=providers_for(device, precision))
        inputs = self.session.get_inputs()
        self.float_dtype = next((_ORT_FLOAT[i.type] for i in inputs if i.type in _ORT_FLOAT), torch.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.device == "cpu":
            outputs = self.session.run(self.output_names, {k: v.numpy() for k, v in feed.items()})
            return [torch.from_numpy(np.asarray(o)) for o in outputs]
        return self._infer_cuda(feed)

    def _infer_cuda(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """IO binding: ORT reads and writes torch's CUDA memory, no host copies."""
        binding = self.session.io_binding()
        device_index = torch.device(self.device).index or 0
        for name, tensor in feed.items():
            tensor = tensor.to(self.device).contiguous()
            binding.bind_input(name, "cuda", device_index, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", device_index)
        torch.cuda.current_stream().synchronize()  # inputs written on torch's stream are ready
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.as_tensor(o.numpy(), device=self.device)
                for o in binding.get_outputs()]

    def close(self) -> None:
        self.session = None


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]
