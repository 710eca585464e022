"""`verify`: run the eager quantizer and a backend on the same inputs and classify every token and vector."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from vqdeploy.errors import BackendOutputError, UnsupportedOptionError
from vqdeploy.export.metadata import read_metadata
from vqdeploy.nn import GroupedResidualVQ, ResidualVQ, VectorQuantize, load_quantizer
from vqdeploy.parity.classify import check_tokens, check_vectors, new_stage_reports
from vqdeploy.parity.inputs import decode_probes, default_inputs
from vqdeploy.parity.model_report import ModelParityReport
from vqdeploy.parity.report import CRITERION_IDENTICAL, ParityReport


def verify(
    model: nn.Module | str | os.PathLike,
    onnx_path: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    precision: str = "exact",
    inputs: list[Any] | Any | None = None,
    num_samples: int = 2048,
    seed: int = 0,
    **load_options: Any,
) -> ParityReport | ModelParityReport:
    """Run the eager quantizer and ``backend`` on the same inputs and classify every token and vector.

    ``model`` is a VectorQuantize / ResidualVQ or the path of a vqdeploy checkpoint. ``inputs`` are
    arrays in the module's input layout (numpy or torch), or indices for a decode export; by
    default `default_inputs` (and `decode_probes` for decode exports).

    A whole-model file (a model exported with its quantizers inside) is verified against the
    eager ``model`` (the module, or a model source as `vqdeploy.parity.model_source.load_model_source`
    reads it): rows and tokens of every search, see `vqdeploy.parity.whole_model.verify_model`;
    ``inputs`` are then the model's inputs, and the report a `ModelParityReport`.
    """
    from vqdeploy import runtime

    if read_metadata(onnx_path).kind == "model":
        from vqdeploy.parity.model_source import load_model_source
        from vqdeploy.parity.whole_model import verify_model

        whole = load_model_source(model) if isinstance(model, str | os.PathLike) else model
        return verify_model(whole, onnx_path, backend=backend, device=device, precision=precision, inputs=inputs,
                            seed=seed, **load_options)

    module = load_quantizer(model) if isinstance(model, str | os.PathLike) else model
    if not isinstance(module, VectorQuantize | ResidualVQ | GroupedResidualVQ):
        raise UnsupportedOptionError(
            f"verify takes a VectorQuantize, ResidualVQ or GroupedResidualVQ (or its checkpoint), got {type(module).__name__}"
        )
    info = read_metadata(onnx_path)
    if info.kind != type(module).__name__:
        raise UnsupportedOptionError(f"{onnx_path} holds a {info.kind} export, but the model is a {type(module).__name__}")

    was_training = module.training
    module.eval()
    try:
        if inputs is None:
            inputs = default_inputs(module, num_samples, seed)
            if info.part == "decode":
                with torch.no_grad():
                    inputs = [module(x)[1] for x in inputs] + [decode_probes(module)]
        elif not isinstance(inputs, list | tuple):
            inputs = [inputs]
        inputs = [torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in inputs]
        if info.part != "decode":
            inputs = [x.float() for x in inputs]

        report = ParityReport(backend=backend, device=device, precision=precision, part=info.part,
                              input_shapes=[list(x.shape) for x in inputs])

        report.stages = new_stage_reports(module)
        with runtime.load(onnx_path, backend=backend, device=device, precision=precision, **load_options) as quantizer, torch.no_grad():
            report.backend = quantizer.backend
            if _exact_like_eager(module, quantizer):
                report.criterion = CRITERION_IDENTICAL
            for x in inputs:
                _compare_one(module, quantizer, info.part, x, report)
    finally:
        module.train(was_training)
    return report


def _exact_like_eager(module: nn.Module, quantizer: Any) -> bool:
    """Whether the backend runs vqdeploy's exact search on the rows the eager model computes.

    The torch backend on CPU does; ONNX Runtime does with the re-check body (`recheck_outputs`)
    where the search's rows are the input itself or reshapes and residuals of it (no projection or
    normalisation, whose float32 results may differ between runtimes). Those are held to identity;
    every other path (TensorRT, CUDA, ONNX Runtime without the re-check) to certified ties.
    """
    if isinstance(module, GroupedResidualVQ):
        return all(_exact_like_eager(rvq, quantizer) for rvq in module.rvqs)
    cosine = module.use_cosine_sim if isinstance(module, VectorQuantize) else module.layers[0].use_cosine_sim
    plain_rows = isinstance(module.project_in, nn.Identity) and not cosine
    if isinstance(module, VectorQuantize) and module.has_affine_codebook:
        plain_rows = False  # the searched codebook is computed in the graph
    if quantizer.backend == "torch":
        return quantizer.search_is_exact
    return quantizer.backend == "ort" and plain_rows and quantizer.search_is_exact


def _compare_one(module: nn.Module, quantizer: Any, part: str, x: torch.Tensor, report: ParityReport) -> None:
    try:
        _compare_outputs(module, quantizer, part, x, report)
    except BackendOutputError as error:  # a graph whose outputs do not fit the model: nothing it served counts
        if str(error) not in report.problems:
            report.problems.append(str(error))
        if part == "decode":
            residual = isinstance(module, ResidualVQ | GroupedResidualVQ)
            rows = x.numel() // (module.num_quantizers if residual else module.heads)
            report.vectors.rows += rows
            report.vectors.violations += rows
            return
        eager = module(x)[1]
        if isinstance(module, GroupedResidualVQ):
            tokens = eager[0].numel() // module.num_quantizers
        else:
            tokens = eager[0].numel() if isinstance(module, ResidualVQ) else eager.numel() // module.heads
        for stage in report.stages:
            stage.tokens += tokens
            stage.violations += tokens


def _compare_outputs(module: nn.Module, quantizer: Any, part: str, x: torch.Tensor, report: ParityReport) -> None:
    if part == "decode":
        vectors = quantizer.decode(x.to(quantizer.device)).cpu()
        check_vectors(module, vectors, x, report.vectors)
        return
    _, eager_indices, _ = module(x)
    if part == "quantize":
        vectors, indices = quantizer.quantize(x.to(quantizer.device))
        vectors, indices = vectors.cpu(), indices.cpu()
    else:
        indices, vectors = quantizer.encode(x.to(quantizer.device)).cpu(), None
    check_tokens(module, x, eager_indices, indices, report.stages, report.problems,
                 identical_only=report.criterion == CRITERION_IDENTICAL)
    if vectors is not None:
        check_vectors(module, vectors, indices, report.vectors)
