"""Token parity through Polygraphy: an eager-module runner and a parity-aware compare function.

Polygraphy's `Comparator` runs `EagerQuantizerRunner` beside its own ONNX Runtime runner (and its
TensorRT runner, over an engine vqdeploy builds, where TensorRT exists) on the same feeds;
`ParityCompareFunc` checks index and vector outputs with `vqdeploy.verify`'s own functions
(tokens against the eager codebooks on the eager rows of the candidate's path, vectors against
the eager decode of the candidate's tokens), so both tools give one verdict.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator
from torch import nn

from vqdeploy.export.metadata import read_metadata
from vqdeploy.nn.parts import PART_MODULES
from vqdeploy.parity.classify import check_tokens, check_vectors, new_stage_reports
from vqdeploy.parity.report import StageReport, VectorReport


class EagerQuantizerRunner(BaseRunner):
    """A Polygraphy runner over the eager quantizer, for one exported part."""

    def __init__(
        self, module: nn.Module, part: str, input_name: str, output_names: list[str], example: np.ndarray,
        name: str = "vqdeploy-eager",
    ):
        super().__init__(name=name)
        self.graph = PART_MODULES[part](module).eval()
        self.input_name, self.output_names = input_name, output_names
        self.example = example

    def activate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        # Every axis dynamic: verify feeds inputs of several lengths (its probes have K rows).
        return TensorMetadata().add(self.input_name, self.example.dtype, [-1] * self.example.ndim)

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.graph(torch.from_numpy(np.asarray(feed_dict[self.input_name])))
        self.inference_time = time.perf_counter() - start  # Polygraphy reports it
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return OrderedDict((name, out.numpy()) for name, out in zip(self.output_names, outputs, strict=True))

    def deactivate_impl(self) -> None:
        pass


class ParityCompareFunc:
    """Compare a candidate runner with the eager one: tokens and vectors as `vqdeploy.verify` does."""

    def __init__(self, module: nn.Module, feeds: list[dict[str, np.ndarray]], input_name: str):
        self.module, self.feeds, self.input_name = module, feeds, input_name
        self.stages = new_stage_reports(module)
        self.vectors = VectorReport()
        self.problems: list[str] = []
        self._iteration = 0

    def __call__(self, reference, candidate) -> OrderedDict:
        # Comparator calls once per iteration, pair after pair, in feed order.
        feed = torch.from_numpy(np.asarray(self.feeds[self._iteration % len(self.feeds)][self.input_name]))
        self._iteration += 1
        verdict = OrderedDict()
        if "indices" in reference:
            before = (sum(s.violations for s in self.stages), len(self.problems))
            eager = torch.from_numpy(np.asarray(reference["indices"]))
            served = torch.from_numpy(np.asarray(candidate["indices"]))
            check_tokens(self.module, feed, eager, served, self.stages, self.problems)
            verdict["indices"] = (sum(s.violations for s in self.stages), len(self.problems)) == before
        if "vectors" in reference:
            # Served vectors against the eager decode of the served tokens (decode: of the feed).
            served_indices = candidate["indices"] if "indices" in candidate else feed
            before = self.vectors.violations
            check_vectors(self.module, torch.from_numpy(np.asarray(candidate["vectors"])),
                          torch.as_tensor(np.asarray(served_indices)), self.vectors)
            verdict["vectors"] = self.vectors.violations == before
        return verdict


def _tensorrt_runner(onnx_path: str | os.PathLike, shape: tuple[int, ...], input_name: str, prefer_aot: bool = False):
    """Polygraphy's TensorRT runner over an engine vqdeploy builds (plugin registered, TF32 off).

    Polygraphy's own network loader cannot be used: from TensorRT 10.9 on both plugin
    implementations are registered, and TensorRT then needs the PREFER_JIT/AOT_PYTHON_PLUGINS
    network flag (or an ``aot`` attribute on the node), which that loader cannot set. The engine
    is built lazily, when the runner activates.
    """
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from vqdeploy.runtime.tensorrt import build_engine

    profile = (shape, shape, shape)
    return TrtRunner(EngineFromBytes(lambda: build_engine(onnx_path, input_name, profile, prefer_aot=prefer_aot)[0]))


def compare_with_polygraphy(
    module: nn.Module, onnx_path: str | os.PathLike, inputs: list[Any], include_tensorrt: bool | None = None
) -> tuple[bool, list[StageReport]]:
    """Run the eager module, Polygraphy's ONNX Runtime runner and, where TensorRT and a GPU exist
    (`include_tensorrt=None` decides by itself), its TensorRT runner through `Comparator`.

    Every runner is compared with the eager one. Returns Polygraphy's overall verdict and the
    per-stage classification behind it (all runners' tokens folded in). Inputs must share one
    shape when TensorRT runs (its profile is built from the first).
    """
    if include_tensorrt is None:
        from vqdeploy.runtime.trt_plugin import tensorrt_unavailable_reason

        include_tensorrt = torch.cuda.is_available() and tensorrt_unavailable_reason() is None
    info = read_metadata(onnx_path)
    module.eval()
    name = info.inputs[0]
    feeds = [{name: np.asarray(torch.as_tensor(x), dtype=np.float32 if info.part != "decode" else np.int64)} for x in inputs]
    runners = [
        EagerQuantizerRunner(module, info.part, name, list(info.outputs), feeds[0][name]),
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])),
    ]
    if include_tensorrt:
        runners.append(_tensorrt_runner(onnx_path, feeds[0][name].shape, name))
    results = Comparator.run(runners, data_loader=feeds)
    compare = ParityCompareFunc(module, feeds, name)
    pairs = [(0, other) for other in range(1, len(runners))]
    accuracy = Comparator.compare_accuracy(results, compare_func=compare, comparisons=pairs)
    return bool(accuracy), compare.stages
