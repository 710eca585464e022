"""Whole-model verify: the parity certificate of a model a user serves (encoder + quantizers).

For every input, the eager model and the backend run the same input; the backend's file is run
with its searches' rows and tokens as extra outputs (`vqdeploy.export.whole_model.with_search_outputs`;
the NearestCode node's first input is exactly the rows its search saw). Per quantizer and search:

1. **Rows.** The backend's rows against the eager model's rows for the same input. For a residual
   stage the eager rows are taken after the *backend's* earlier tokens (`ResidualVQ.search_rows`),
   so a stage is judged on its own input even after an earlier stage crossed a tie. The tolerance
   is derived from the float32 error of the layers upstream, measured on that input: the same
   model in float64 (a copy, ``model.double()``) gives the rows without float32 rounding, and

       tolerance = S * max( max|rows_f32 - rows_f64|, 2^-24 * max|rows_f64| )

   The backend evaluates the same float32 layers in another order and with other kernels; its
   rounding error is of the same kind as the eager model's, and the difference of two float32
   evaluations is at most the sum of their errors, so S (default 16) leaves room for a backend
   whose kernels round a few times worse than eager's. A row that drifts more is a violation: the
   model computes other rows (a tampered encoder weight, a float16-rounded encoder, a skipped
   residual stage). The floor 2^-24 max|row| is one float32 rounding of the rows themselves.
2. **Tokens.** Every served token against the eager model's codebook on the backend's own rows:
   identical (the exact nearest code), a certified tie (`vqdeploy.ops.certify`, the one tie rule),
   or a violation (a tampered code, a rounded codebook or search).

The end-to-end table then says how many served tokens differ from the eager model's own tokens
and why: a tie crossing (the rows drifted within tolerance and the token is right for the
backend's rows), a token after an earlier stage's crossing (its residual legitimately differs), or
a violation. The graph output that holds each quantizer's tokens (metadata ``tokens_output``) is
compared with the searches' tokens too: a file that serves other tokens than its searches found
(a dropped stage) fails.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from vqdeploy.errors import NotAVQDeployModelError, UnsupportedOptionError
from vqdeploy.export.metadata import ExportInfo, read_metadata
from vqdeploy.export.searches import record_searches, reference_rows, served_indices
from vqdeploy.ops import nearest_code
from vqdeploy.parity.classify import _classify
from vqdeploy.parity.model_report import ModelParityReport, SearchParity
from vqdeploy.parity.report import StageReport

DEFAULT_SAFETY = 16.0
UNIT_ROUNDOFF = 2.0**-24


def default_model_inputs(info: ExportInfo, num_inputs: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Seeded standard-normal inputs of the shapes the export traced (``example_shapes``)."""
    if not info.example_shapes:
        raise UnsupportedOptionError("this file does not record its example input shapes: pass inputs=")
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*shape, generator=generator) for shape in info.example_shapes) for _ in range(num_inputs)]


def _as_examples(inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    """inputs: one array, a list of examples; an example is an array or a tuple of arrays."""
    if isinstance(inputs, torch.Tensor | np.ndarray):
        inputs = [inputs]
    examples = []
    for example in inputs:
        parts = example if isinstance(example, tuple) else (example,)
        examples.append(tuple(torch.as_tensor(np.asarray(p)) if not isinstance(p, torch.Tensor) else p for p in parts))
    return examples


def _float64_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model).double().eval()
    except Exception as error:  # a module that cannot be copied or cast
        raise UnsupportedOptionError(
            f"whole-model verify measures the upstream float32 error on a float64 copy of the model, and "
            f"copy.deepcopy(model).double() failed: {error}"
        ) from error


def _new_search(entry: dict[str, Any]) -> SearchParity:
    return SearchParity(
        search=entry["id"], quantizer=entry["quantizer"], label=entry["label"], codebook_size=entry["codebook_size"],
        dim=entry["dim"], tokens=StageReport(entry["id"], codebook_size=entry["codebook_size"]),
    )


def verify_model(
    model: nn.Module,
    onnx_path: str | os.PathLike | bytes,
    *,
    backend: str = "ort",
    device: str = "cpu",
    precision: str = "exact",
    inputs: Any = None,
    num_inputs: int = 2,
    seed: int = 0,
    safety: float = DEFAULT_SAFETY,
    **load_options: Any,
) -> ModelParityReport:
    """Verify a whole-model export against the eager ``model`` (see the module docstring).

    ``inputs``: one array, or a list of examples (an array, or a tuple of arrays for a model with
    several inputs); by default ``num_inputs`` seeded normal inputs of the traced shapes.
    The torch backend runs ``model``'s own code with the file's weights.
    """
    from vqdeploy import runtime
    from vqdeploy.export.onnx import find_quantizers

    info = read_metadata(onnx_path)
    if info.kind != "model":
        raise UnsupportedOptionError(f"{onnx_path} holds a bare {info.kind}; verify it with the quantizer itself")
    if not info.searches:
        raise NotAVQDeployModelError(
            f"{onnx_path} does not describe its searches (written before vqdeploy described whole models, or its "
            "NearestCode nodes did not match the eager searches): export it again with this version"
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedOptionError(f"verify of a whole-model file takes the torch module, got {type(model).__name__}")
    quantizers = find_quantizers(model)
    if sorted(quantizers) != sorted(q["path"] for q in info.quantizers):
        raise UnsupportedOptionError(
            f"{onnx_path} describes quantizers {[q['path'] for q in info.quantizers]}, the model holds {sorted(quantizers)}"
        )
    examples = default_model_inputs(info, num_inputs, seed) if inputs is None else _as_examples(inputs)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    model64 = _float64_copy(model)
    quantizers64 = find_quantizers(model64)
    report = ModelParityReport(backend=backend, device=device, precision=precision,
                               input_shapes=[[list(t.shape) for t in ex] for ex in examples], safety=safety)
    report.searches = [_new_search(entry) for entry in info.searches]
    options = dict(load_options)
    if backend == "torch":
        options["model"] = model
    try:
        with runtime.load(onnx_path, backend=backend, device=device, precision=precision, search_outputs=True,
                          **options) as served, torch.no_grad():
            report.backend = served.backend
            for example in examples:
                _verify_one(model, model64, quantizers, quantizers64, info, served, example, report)
    finally:
        for module, training in modes:
            module.training = training
    return report


def _verify_one(model, model64, quantizers, quantizers64, info: ExportInfo, served, example, report) -> None:
    example = tuple(t.float() if t.is_floating_point() else t for t in example)
    with record_searches(model, quantizers) as eager:
        model(*example)
    with record_searches(model64, quantizers64, search_dtype=torch.float32) as exact:
        model64(*(t.double() if t.is_floating_point() else t for t in example))
    outputs = served.run([t.to(served.device) for t in example])
    outputs = {k: v.cpu() for k, v in outputs.items()}
    if len(eager.searches) != len(info.searches):
        report.problems.append(f"the eager model made {len(eager.searches)} searches, the file describes {len(info.searches)}")
        return

    by_call: dict[tuple[str, int], list[int]] = {}
    for number, entry in enumerate(info.searches):
        by_call.setdefault((entry["quantizer"], entry["call"]), []).append(number)
    for (path, call), numbers in by_call.items():
        x32 = next(c.input for c in eager.calls if c.quantizer == path and c.call == call)
        x64 = next(c.input for c in exact.calls if c.quantizer == path and c.call == call)
        entries = [info.searches[n] for n in numbers]
        rows_b = [outputs[e["rows_output"]].float() for e in entries]
        tokens_b = [outputs[e["tokens_output"]].reshape(-1).long() for e in entries]
        shapes_ok = all(r.shape == eager.searches[n].rows.shape and t.numel() == r.shape[0]
                        for r, t, n in zip(rows_b, tokens_b, numbers, strict=True))
        if not shapes_ok:
            report.problems.append(
                f"{path}: the backend's searches returned rows of shapes {[tuple(r.shape) for r in rows_b]}, the eager "
                f"model's are {[tuple(eager.searches[n].rows.shape) for n in numbers]}"
            )
            for n in numbers:
                report.searches[n].tokens.tokens += eager.searches[n].tokens.numel()
                report.searches[n].tokens.violations += eager.searches[n].tokens.numel()
            continue
        quantizer, quantizer64 = quantizers[path], quantizers64[path]
        ref32 = reference_rows(quantizer, x32, tokens_b)
        ref64 = reference_rows(quantizer64, x64, tokens_b)
        earlier = torch.zeros(rows_b[0].shape[0], dtype=torch.bool)
        for k, n in enumerate(numbers):
            search, eager_search = report.searches[n], eager.searches[n]
            rows, reference, reference64 = rows_b[k], ref32[k].float().cpu(), ref64[k].double().cpu()
            if earlier.shape[0] != rows.shape[0]:  # stages at other strides (SNAC): a change anywhere in the clip
                batch = x32.shape[0]
                earlier = earlier.reshape(batch, -1).any(dim=1).repeat_interleave(rows.shape[0] // batch)
            error = float((reference.double() - reference64).abs().max()) if reference.numel() else 0.0
            scale = float(reference64.abs().max()) if reference.numel() else 0.0
            tolerance = report.safety * max(error, UNIT_ROUNDOFF * scale)
            drift = (rows - reference).abs().amax(dim=1) if rows.numel() else torch.zeros(0)
            drift = drift.nan_to_num(nan=float("inf"))
            over = drift > tolerance
            search.rows += rows.shape[0]
            search.rows_over_tolerance += int(over.sum())
            search.max_drift = max(search.max_drift, float(drift.max()) if drift.numel() else 0.0)
            search.tolerance = max(search.tolerance, tolerance)
            search.eager_error = max(search.eager_error, error)
            if drift.numel() and tolerance > 0:
                search.worst_drift_over_tolerance = max(search.worst_drift_over_tolerance, float(drift.max()) / tolerance)
            codebook = eager_search.codebook.float().cpu()
            expected = nearest_code(rows.contiguous(), codebook)  # the exact nearest code on the backend's rows
            token_report = search.tokens
            before = token_report.violations
            served_tokens = tokens_b[k]
            _classify(token_report, rows, codebook, expected, served_tokens)
            bad_token = torch.zeros_like(over)
            if token_report.violations > before:
                from vqdeploy.ops import certify

                differs = served_tokens != expected
                certificate = certify(rows[differs], codebook, served_tokens[differs])
                bad_token[torch.nonzero(differs).squeeze(1)] = ~certificate.certified
            differ = served_tokens != eager_search.tokens.reshape(-1).cpu().long()
            violation = differ & (over | bad_token)
            after = differ & ~violation & earlier
            search.differ_from_eager += int(differ.sum())
            search.differ_violations += int(violation.sum())
            search.after_earlier_stage += int(after.sum())
            search.tie_crossings += int((differ & ~violation & ~earlier).sum())
            earlier |= differ
        _check_tokens_output(info, path, call, quantizer, x32, tokens_b, outputs, report)


def _check_tokens_output(info, path, call, quantizer, x32, tokens_b, outputs, report) -> None:
    """The graph output holding the quantizer's tokens must be what its searches found."""
    entry = next(q for q in info.quantizers if q["path"] == path)
    name, axes = entry.get("tokens_output"), entry.get("tokens_axes")
    if call != 0 or not name or axes is None:
        return
    if name not in report.outputs_checked:
        report.outputs_checked.append(name)
    got = outputs.get(name)
    stages = entry.get("stages", len(tokens_b))
    want = served_indices(quantizer, x32.cpu(), tokens_b).permute(axes)
    if got is None or got.numel() != want.numel():
        report.problems.append(
            f"output {name!r} has shape {None if got is None else tuple(got.shape)}, but the {stages} search(es) of "
            f"{path} found tokens for {tuple(want.shape)}: the file serves other tokens than its searches found"
        )
        return
    mismatched = int((got.reshape(-1).long() != want.reshape(-1).cpu()).sum())
    if mismatched:
        report.problems.append(
            f"output {name!r}: {mismatched} of {want.numel()} tokens are not those the searches of {path} found"
        )


__all__ = ["DEFAULT_SAFETY", "default_model_inputs", "verify_model"]
