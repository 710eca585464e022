"""ONNX Runtime backend: CPU execution provider, and the CUDA one where onnxruntime-gpu is installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqdeploy.errors import BackendNotAvailableError
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.runtime.devices import check_device

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
    """Execution providers for `device`. TF32 stays off on CUDA in both precisions (docs/design.md section 4):
    ONNX Runtime has no parity-preserving tensor-core search, and TF32 in its MatMul changes tokens."""
    ort = _import_onnxruntime()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendNotAvailableError(
            "Could not find the ONNX Runtime CUDA execution provider. Requested provider was: "
            f"CUDAExecutionProvider, but available providers are: {available}. pip install onnxruntime-gpu"
        )
    index = check_device(device).index or 0
    options = {"device_id": index, "use_tf32": 0}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class OnnxRuntimeRunner:
    """Runs an exported graph in one InferenceSession (thread-safe: ORT allows concurrent run calls)."""

    name = "ort"
    materializes_scores = True

    def __init__(
        self,
        path: str | os.PathLike | bytes,
        info: ExportInfo | None = None,
        *,
        device: str = "cpu",
        precision: str = "exact",
        intra_op_num_threads: int | None = None,
        inter_op_num_threads: int | None = None,
        allow_spinning: bool = True,
        recheck: bool = True,
    ):
        """``recheck`` (default, with ``info``): run the search body that also flags the rows its
        float32 margin cannot prove, so the Quantizer re-solves them exactly (`recheck_outputs`)."""
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        if inter_op_num_threads is not None:
            options.inter_op_num_threads = inter_op_num_threads
        if not allow_spinning:
            # ORT's workers spin for a while after each run (ORT's default, lowest latency); that
            # slows other work on the same cores, e.g. a torch encode right after one took 2x.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.device = device
        source = bytes(path) if isinstance(path, bytes | bytearray | memoryview) else str(Path(path))
        self._source, self._info, self._exact = source, info, None
        self.recheck_outputs = 0  # trailing outputs: bool[M] per search, rows to re-solve exactly
        if recheck and info is not None and info.kind != "model" and info.part != "decode" and info.codebook_size > 1:
            import onnx

            from vqdeploy.export.functions import with_recheck_outputs

            model = onnx.load_model_from_string(source) if isinstance(source, bytes) else onnx.load(source)
            model, names = with_recheck_outputs(model, info.codebook_dim)
            if names:
                source, self.recheck_outputs = model.SerializeToString(), len(names)
                self._exact_runner()  # built (and the CPU kernel compiled) now, not inside an encode
        self.session = ort.InferenceSession(source, options, providers=providers_for(device, precision))
        inputs = self.session.get_inputs()
        self.float_dtype = next((_ORT_FLOAT[i.type] for i in inputs if i.type in _ORT_FLOAT), torch.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.device == "cpu":
            outputs = self.session.run(self.output_names, {k: v.numpy() for k, v in feed.items()})
            return [torch.from_numpy(np.asarray(o)) for o in outputs]
        return self._infer_cuda(feed)

    def _output_shapes(self, feed: dict[str, torch.Tensor]) -> list[tuple[int, ...]] | None:
        """Concrete output shapes: symbolic dims ("batch", "seq"...) take the sizes the inputs gave them."""
        sizes: dict[str, int] = {}
        for meta in self.session.get_inputs():
            for dim, size in zip(meta.shape, feed[meta.name].shape, strict=True):
                if isinstance(dim, str):
                    sizes[dim] = size
        shapes = []
        for meta in self.session.get_outputs():
            if any(isinstance(d, str) and d not in sizes for d in meta.shape) or any(d is None for d in meta.shape):
                return None
            shapes.append(tuple(sizes[d] if isinstance(d, str) else d for d in meta.shape))
        return shapes

    def _infer_cuda(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """IO binding: ORT reads and writes torch's CUDA memory, no host copies."""
        binding = self.session.io_binding()
        device_index = torch.device(self.device).index or 0
        inputs = {name: tensor.to(self.device).contiguous() for name, tensor in feed.items()}
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", device_index, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        shapes = self._output_shapes(inputs)
        outputs: list[torch.Tensor] = []
        for i, meta in enumerate(self.session.get_outputs()):
            if shapes is None:
                binding.bind_output(meta.name, "cuda", device_index)
                continue
            dtype = torch.int64 if meta.type == "tensor(int64)" else _ORT_FLOAT.get(meta.type, torch.float32)
            out = torch.empty(shapes[i], dtype=dtype, device=self.device)
            binding.bind_output(meta.name, "cuda", device_index, _numpy_dtype(dtype), list(out.shape), out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream().synchronize()  # inputs written on torch's stream are ready
        self.session.run_with_iobinding(binding)
        if shapes is not None:
            return outputs
        # Shapes unknown before the run: ORT allocated the outputs; hand them over by DLPack when the
        # build supports it, else through the host.
        values = binding.get_outputs()
        if all(hasattr(v, "to_dlpack") for v in values):
            return [torch.from_dlpack(v.to_dlpack()) for v in values]
        return [torch.from_numpy(v.numpy()).to(self.device) for v in values]

    def _exact_runner(self):
        if self._exact is None:
            from vqdeploy.ops import cpu_kernels
            from vqdeploy.runtime.torch_backend import TorchRunner

            self._exact = TorchRunner(self._source, self._info, device="cpu")
            if cpu_kernels.available():  # compiles (or loads from numba's cache) the CPU search kernel
                # One full-size call now starts the kernel's thread pool and allocates the tile it
                # keeps between calls (16 MiB), and one exact re-solve starts the float64 GEMM's
                # buffers, at load time, not inside the first encode that has a row to re-solve (the
                # first such encode of a 4M-vector image grew the process by 94 MiB, later ones by 4).
                from vqdeploy.ops.contract import exact_nearest, rows_per_block

                dim, codes = self._info.codebook_dim, self._info.codebook_size
                codebook = torch.randn(codes, dim, generator=torch.Generator().manual_seed(0))
                rows = codebook[torch.arange(rows_per_block(codes)) % codes]  # on a code each: no near tie
                cpu_kernels.nearest_code_cpu(rows, codebook)
                exact_nearest(rows[: min(4096, rows.shape[0])], codebook)
        return self._exact

    def exact_infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The same graph's outputs from vqdeploy's exact torch path (the file's weights), on CPU."""
        return self._exact_runner().infer({name: value.cpu() for name, value in feed.items()})

    def close(self) -> None:
        self.session = None
        self._exact = None


def _numpy_dtype(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]
