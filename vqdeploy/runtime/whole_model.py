"""Whole-model files (metadata kind "model"): `WholeModel.run` (named outputs) and `encode` where
an output holds a quantizer's tokens, on ONNX Runtime and on plain torch.

ONNX Runtime runs the file's graph as it is (its searches are the graph's float32 MatMul + ArgMin:
a served token may be a certified tie rather than the exact argmin; `vqdeploy.verify` says which).
The torch backend cannot rebuild an arbitrary graph as torch code, and a second graph
interpreter (an onnx2torch-like converter) would be a second implementation to trust. It runs
the user's own module instead, given as ``runtime.load(path, backend="torch", model=module)``,
with the file's weights: every initializer whose name is a state-dict key of the module (the
export keeps those names) is loaded into a copy of it, so what runs is the file's weights in the
module's eager code, with vqdeploy's exact search. The module is the architecture; the file is the
weights.

``search_outputs=True`` (what verify asks for) adds, after the graph's outputs, every search's
rows and tokens (`vqdeploy.export.whole_model.with_search_outputs`): on ONNX Runtime from the
graph's NearestCode inputs and outputs, on torch from the module's searches as it runs.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils import _pytree

from vqdeploy.errors import (
    BackendOutputError,
    DeviceNotAvailableError,
    InputShapeError,
    NonFiniteInputError,
    NotAVQDeployModelError,
    UnsupportedOptionError,
)
from vqdeploy.export.metadata import ExportInfo
from vqdeploy.runtime.base import Quantizer


def _load_proto(path: str | os.PathLike | bytes) -> onnx.ModelProto:
    if isinstance(path, bytes | bytearray | memoryview):
        return onnx.load_model_from_string(bytes(path))
    return onnx.load(str(path))


def search_output_names(info: ExportInfo) -> list[str]:
    """Graph outputs of the verification variant after the model's own: rows, tokens per search."""
    return [name for s in info.searches for name in (s["rows_output"], s["tokens_output"])]


def model_outputs(info: ExportInfo) -> list[str]:
    """The model's own outputs (a file written with verification_outputs=True lists the search outputs too)."""
    extra = set(search_output_names(info))
    return [name for name in info.outputs if name not in extra]


class TorchModelRunner:
    """Runs the user's module with the file's weights (see the module docstring)."""

    name = "torch"
    materializes_scores = False

    def __init__(self, path: str | os.PathLike | bytes, info: ExportInfo, model: nn.Module | None,
                 device: str = "cpu", precision: str = "exact", search_outputs: bool = False):
        from vqdeploy.export.onnx import find_quantizers
        from vqdeploy.nn import VectorQuantize

        if model is None:
            raise UnsupportedOptionError(
                "the torch backend runs a whole-model file through the module it was exported from: "
                "runtime.load(path, backend='torch', model=module) (or use backend='ort')"
            )
        if not isinstance(model, nn.Module):
            raise UnsupportedOptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceNotAvailableError("device='cuda' was asked for, but torch sees no CUDA device")
        proto = _load_proto(path)
        module = copy.deepcopy(model).eval()
        state = module.state_dict()
        loaded: dict[str, torch.Tensor] = {}
        for init in proto.graph.initializer:
            if init.name not in state:
                continue
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            if tuple(value.shape) != tuple(state[init.name].shape):
                raise NotAVQDeployModelError(
                    f"initializer {init.name} has shape {tuple(value.shape)} in the file but "
                    f"{tuple(state[init.name].shape)} in the model given: it is not the module this file was exported from"
                )
            loaded[init.name] = value.to(state[init.name].dtype)
        self.quantizers = find_quantizers(module)
        described = [q["path"] for q in info.quantizers]
        if sorted(self.quantizers) != sorted(described):
            raise NotAVQDeployModelError(
                f"the file describes quantizers {described}, the model given holds {sorted(self.quantizers)}"
            )
        embeds = [k for k in state if k.endswith("_codebook.embed")]
        if not any(k in loaded for k in embeds):
            raise NotAVQDeployModelError(
                "none of the model's codebooks is among the file's initializers: it is not the module this file was "
                "exported from"
            )
        module.load_state_dict(loaded, strict=False)
        for sub in module.modules():
            if isinstance(sub, VectorQuantize):
                sub._codebook.search_mode = "exact" if precision == "exact" else "fast"
        self.module = module.to(device)
        self.loaded = sorted(loaded)
        self.device = device
        self.info = info
        self.search_outputs = search_outputs
        self.float_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        self.output_names = model_outputs(info) + (search_output_names(info) if search_outputs else [])

    @torch.inference_mode()
    def infer(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        from vqdeploy.export.searches import record_searches

        args = [feed[name].to(self.device) for name in self.info.inputs]
        with record_searches(self.module, self.quantizers) as recording:
            outputs = self.module(*args)
        leaves = [leaf for leaf in _pytree.tree_flatten(outputs)[0] if isinstance(leaf, torch.Tensor)]
        expected = model_outputs(self.info)
        if len(leaves) != len(expected):
            raise BackendOutputError(
                f"the model's forward returned {len(leaves)} tensors, the file has {len(expected)} outputs ({expected})"
            )
        if not self.search_outputs:
            return leaves
        if len(recording.searches) != len(self.info.searches):
            raise BackendOutputError(
                f"the model made {len(recording.searches)} searches, the file describes {len(self.info.searches)}"
            )
        for search in recording.searches:
            leaves += [search.rows.float(), search.tokens]
        return leaves

    def close(self) -> None:
        self.module = None


class WholeModel(Quantizer):
    """A whole-model export opened by `vqdeploy.runtime.load`: ``run(inputs)`` returns the named
    outputs; ``encode(x)`` the tokens output of a one-input model with one quantizer."""

    def __init__(self, info: ExportInfo, runner: Any):
        self.info = info
        self._runner = runner
        self.chunk_size = None  # a model runs whole: its inputs are not cut into chunks
        # close() waits for calls in flight and refuses new ones, as a Quantizer's does.
        self._state = threading.Condition()
        self._active = 0
        self._closed = False
        self.inputs = list(info.inputs)
        self.outputs = list(runner.output_names)

    @property
    def search_is_exact(self) -> bool:
        return self.backend == "torch" and torch.device(self.device).type == "cpu"

    def __repr__(self) -> str:
        return f"WholeModel(inputs={self.inputs}, outputs={model_outputs(self.info)}, backend={self.backend}, device={self.device})"

    @property
    def tokens_outputs(self) -> dict[str, str]:
        """Quantizer path -> the output holding its tokens."""
        return {q["path"]: q["tokens_output"] for q in self.info.quantizers if q.get("tokens_output")}

    def _feeds(self, inputs: Any) -> tuple[dict[str, torch.Tensor], bool]:
        if isinstance(inputs, dict):
            unknown = sorted(set(inputs) - set(self.inputs))
            missing = [n for n in self.inputs if n not in inputs]
            if unknown or missing:
                raise UnsupportedOptionError(f"the file's inputs are {self.inputs}; got {sorted(inputs)}")
            values = [inputs[n] for n in self.inputs]
        else:
            values = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
            if len(values) != len(self.inputs):
                raise UnsupportedOptionError(f"the file takes {len(self.inputs)} inputs ({self.inputs}), got {len(values)}")
        feeds, as_numpy = {}, False
        for name, value, shape in zip(self.inputs, values, self.info.input_shapes or [None] * len(values), strict=True):
            tensor, is_numpy = self._as_tensor(value, name)
            as_numpy = as_numpy or is_numpy
            if shape is not None:
                self._check_shape(name, tensor, shape)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteInputError(f"{name} holds NaN or Inf values")
            if tensor.is_floating_point():
                tensor = tensor.to(self._runner.float_dtype)
            feeds[name] = tensor.contiguous()
        return feeds, as_numpy

    def _check_shape(self, name: str, tensor: torch.Tensor, shape: list[Any]) -> None:
        if tensor.ndim != len(shape):
            raise InputShapeError(f"{name} must have {len(shape)} axes {tuple(shape)}, got shape {tuple(tensor.shape)}")
        fixed = [(axis, size) for axis, size in enumerate(shape) if isinstance(size, int) and size > 0]
        wrong = [(axis, size) for axis, size in fixed if tensor.shape[axis] != size]
        if wrong:
            axis, size = wrong[0]
            raise InputShapeError(
                f"{name} has size {tensor.shape[axis]} on axis {axis}, but this file was exported with a fixed size "
                f"{size} there (input shape {tuple(shape)}: a fixed frame); cut or pad the input to it, or export "
                "again with that axis in dynamic_shapes"
            )

    def run(self, inputs: Any) -> dict[str, Any]:
        """Run the model: ``inputs`` is one array, a list in the file's input order, or a dict by
        name (numpy or torch). Returns {output name: array}, numpy for numpy inputs."""
        feeds, as_numpy = self._feeds(inputs)
        outputs = self._runner.infer(feeds)
        if len(outputs) != len(self.outputs):
            raise BackendOutputError(f"the {self.backend} backend returned {len(outputs)} outputs, expected {self.outputs}")
        return {name: (out.cpu().numpy() if as_numpy else out) for name, out in zip(self.outputs, outputs, strict=True)}

    def encode(self, x: Any) -> Any:
        """The tokens output, for a one-input model whose one quantizer's tokens are an output."""
        holders = self.tokens_outputs
        if len(holders) != 1 or len(self.inputs) != 1:
            raise UnsupportedOptionError(
                f"encode() needs one input and one tokens output; this model has inputs {self.inputs} and tokens "
                f"outputs {holders or 'none'}: use run()"
            )
        return self.run(x)[next(iter(holders.values()))]

    def quantize(self, x: Any) -> tuple[Any, Any]:
        raise UnsupportedOptionError("quantize() runs a bare-quantizer export; a whole model runs with run() or encode()")

    def decode(self, indices: Any) -> Any:
        raise UnsupportedOptionError("decode() runs a bare-quantizer export; a whole model runs with run()")


def load_model(path: str | os.PathLike | bytes, info: ExportInfo, backend: str, device: str, precision: str,
               model: nn.Module | None = None, search_outputs: bool = False, **options: Any) -> WholeModel:
    """`vqdeploy.runtime.load` for kind "model" files."""
    if search_outputs and not info.searches:
        raise NotAVQDeployModelError(
            "this file's metadata lists no searches (written by an older vqdeploy, or its NearestCode nodes did not "
            "match the eager searches): export it again to verify it"
        )
    if backend == "torch":
        if options:
            raise UnsupportedOptionError(f"the torch backend takes model= and no other options, got {sorted(options)}")
        return WholeModel(info, TorchModelRunner(path, info, model, device, precision, search_outputs))
    if model is not None:
        raise UnsupportedOptionError(f"model= is for the torch backend; the {backend} backend runs the file's graph")
    if backend == "ort":
        from vqdeploy.runtime.onnxrt import OnnxRuntimeRunner

        source = path
        if search_outputs:
            from vqdeploy.export.whole_model import with_search_outputs

            source = with_search_outputs(_load_proto(path), info.searches).SerializeToString()
        runner = OnnxRuntimeRunner(source, device=device, precision=precision, info=info, **options)
        wanted = model_outputs(info) + (search_output_names(info) if search_outputs else [])
        if runner.output_names != wanted:  # the graph's own order, whatever the file lists
            runner.output_names = [n for n in wanted if n in runner.output_names]
        return WholeModel(info, runner)
    raise UnsupportedOptionError(
        f"whole-model files run on the ort and torch backends; {backend!r} builds engines of bare quantizers"
    )


__all__ = ["TorchModelRunner", "WholeModel", "load_model", "model_outputs", "search_output_names"]
