"""export_onnx: a quantizer (encode / decode / quantize) or a model around it, to one ONNX file."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from torch.export import Dim

from vqdeploy.errors import (
    ExportError,
    UninitializedCodebookError,
    UnsupportedOptionError,
)
from vqdeploy.export import codec_parts, functions, whole_model
from vqdeploy.export.metadata import (
    PART_INPUTS,
    PART_OUTPUTS,
    PARTS,
    STATE_PREFIX,
    build_info,
    write_metadata,
)
from vqdeploy.files import atomic_write, check_output_path
from vqdeploy.nn import FactorizedResidualVQ, GroupedResidualVQ, ResidualVQ, SplitResidualVQ, VectorQuantize
from vqdeploy.nn.parts import PART_MODULES
from vqdeploy.spec import QuantizerSpec

IR_VERSION = 10  # ONNX Runtime >= 1.20 loads it; onnx 1.23 would write 14 by default
DEFAULT_OPSET = 18
# The newest opset torch's exporter writes natively (newer ones go through onnxscript's version
# converter, which fails on this graph) and ONNX Runtime loads.
MAX_OPSET = 23
INDEX_DTYPES = ("int64", "int32")
QUANTIZER_KINDS = (VectorQuantize, ResidualVQ, FactorizedResidualVQ, SplitResidualVQ)


# what export_onnx takes bare (the codec kinds' layouts: export/codec_parts.py)
QUANTIZERS = (VectorQuantize, ResidualVQ, GroupedResidualVQ, FactorizedResidualVQ, SplitResidualVQ)
QUANTIZER_KINDS = QUANTIZERS


def find_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> VectorQuantize / ResidualVQ / GroupedResidualVQ inside `model` (their parts not listed).

    A SplitResidualVQ (Mimi's semantic + acoustic stacks) is not one of them: its two ResidualVQ
    halves are, each with its own searches.
    """
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, SplitResidualVQ):
            continue
        if isinstance(module, QUANTIZERS) and not any(path.startswith(p + ".") for p in found if p):
            found[path] = module
    return found


def _example_input(quantizer: nn.Module, part: str) -> torch.Tensor:
    """A small input with sizes >= 2 on every dynamic axis (torch.export specialises sizes 0 and 1)."""
    return QuantizerSpec.from_module(quantizer).example_input(part)


def _dynamic_axes(quantizer: nn.Module, part: str, example: torch.Tensor) -> dict[int, object]:
    """Batch and sequence (or height and width) axes of the part's input."""
    return dict.fromkeys(QuantizerSpec.from_module(quantizer).dynamic_axis_names(part, example.ndim), Dim.DYNAMIC)


_SYMBOL = whole_model.DIM_SYMBOL


def name_dynamic_dims(proto: onnx.ModelProto, axis_names: dict[int, str]) -> onnx.ModelProto:
    """Rename the exporter's symbols ("s77", "s27"...) to `axis_names` of the first graph input, everywhere.

    The symbol found on input axis i becomes axis_names[i], in the graph's inputs, outputs and
    value_info, inside expressions too ("s27*s77" -> "seq*batch"). Symbols not on those axes stay.
    """
    graph_input = proto.graph.input[0].type.tensor_type.shape.dim
    mapping: dict[str, str] = {}
    for axis, name in axis_names.items():
        symbol = graph_input[axis].dim_param if axis < len(graph_input) else ""
        if _SYMBOL.fullmatch(symbol) and symbol not in mapping:  # a bare symbol, not an expression
            mapping[symbol] = name
    if not mapping:
        return proto

    def rename(text: str) -> str:
        return _SYMBOL.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = rename(dim.dim_param)
    return proto


def _nearest_code_translation(x, codebook, mode: str = "exact"):
    """onnxscript translation of torch.ops.vqdeploy.nearest_code: one fused NearestCode node."""
    import onnxscript

    vqdeploy_ops = onnxscript.values.Opset(functions.DOMAIN, functions.FUNCTION_VERSION)
    return vqdeploy_ops.NearestCode(x, codebook, plugin_namespace=functions.PLUGIN_NAMESPACE)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and torchvision notices; keep them out of the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_ready(quantizers: dict[str, nn.Module]) -> None:
    for path, quantizer in quantizers.items():
        for module in quantizer.modules():
            if isinstance(module, ResidualVQ) and module.implicit_neural_codebook:
                raise UnsupportedOptionError(
                    f"{path or type(quantizer).__name__} uses implicit_neural_codebook: each position searches a "
                    "codebook of its own (an MLP of the running sum), which the NearestCode export does not express; "
                    "run it eagerly"
                )
            if isinstance(module, VectorQuantize) and not module.initialized:
                name = path or type(quantizer).__name__
                raise UninitializedCodebookError(
                    f"{name} uses kmeans_init=True and its codebook was never initialised; "
                    "train it on at least one batch before exporting"
                )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    part: str = "quantize",
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    fused: bool = True,
    opset: int | None = None,
    overwrite: bool = False,
    index_dtype: str = "int64",
    n_q: int | None = None,
    dynamic_shapes: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    verification_outputs: bool = False,
) -> Path:
    """Export a quantizer, or a model that contains quantizers, to an ONNX file at `path`.

    For a bare VectorQuantize / ResidualVQ / GroupedResidualVQ (one graph for all its groups), `part` picks ``"encode"`` (x -> indices),
    ``"decode"`` (indices -> vectors) or ``"quantize"`` (x -> vectors, indices). Any other module
    is exported whole (its forward) and needs `example_input`. Batch and sequence axes (image:
    batch, height, width) are dynamic. With ``fused=True`` every nearest-code search is one
    ``vqdeploy::NearestCode`` node backed by a model-local function; with ``fused=False`` the same
    computation is inlined in standard ops. ``index_dtype="int32"`` (encode and quantize of a bare
    quantizer) makes the indices output int32: one Cast at the end of the graph, for runtimes
    such as TensorRT where an INT64 output costs casts of its own. ``n_q`` (encode and quantize of
    a residual quantizer) bakes in the number of stages used (default all). The codec kinds
    (`FactorizedResidualVQ`, `SplitResidualVQ`) export their parts the same way, channel-first, in
    their own token layout (SNAC's per-stage tokens are one output / input per stage,
    ``indices_0``...). Returns the path written.

    A whole model (any other module; see "Whole models" in the README) takes these as well:

    - ``dynamic_shapes``: which input axes stay dynamic. ``None`` (default) makes every axis
      dynamic; ``False`` (or ``"static"``) fixes every axis to ``example_input``'s sizes (a fixed
      frame: an encoder with an LSTM, say, exports only so); otherwise one ``{axis: name}`` dict
      per input (a tuple, or a dict keyed by the forward's argument names), as torch.export takes
      it, e.g. ``({0: "batch"},)`` for a dynamic batch and a fixed frame length. The sizes of the
      fixed axes are the frame the file serves; they are written to the metadata (``input_shapes``)
      and checked by `vqdeploy.runtime`.
    - ``input_names`` / ``output_names``: graph names. By default the inputs are ``input``
      (``input_0``...), an output that holds a quantizer's tokens is ``tokens`` (``<path>.tokens``
      with several quantizers) and the others ``output`` (``output_0``...).
    - ``verification_outputs=True``: each search's rows and tokens are extra graph outputs
      (``search.<id>.rows``, ``search.<id>.tokens``), as `vqdeploy.verify` reads them (it builds the same
      outputs at load time for a file written without them).

    The metadata lists every quantizer (kind, stages, K, dims, the output holding its tokens) and
    every search (``searches``: its quantizer, stage or head, K, dim, node and rows output).

    >>> import tempfile, pathlib, vqdeploy
    >>> vq = vqdeploy.VectorQuantize(dim=8, codebook_size=16)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "vq.onnx"
    >>> export_onnx(vq, out, part="encode").name
    'vq.onnx'
    """
    path = check_output_path(path, overwrite)  # refused before the export's work, and again at the write
    if part not in PARTS and part != "model":
        raise UnsupportedOptionError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    opset = DEFAULT_OPSET if opset is None else opset
    if index_dtype not in INDEX_DTYPES:
        raise UnsupportedOptionError(f"index_dtype must be one of {', '.join(INDEX_DTYPES)}, got {index_dtype!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not functions.MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedOptionError(
            f"opset must be an integer from {functions.MIN_OPSET} to {MAX_OPSET} (what torch's exporter and this "
            f"onnx write), got {opset!r}"
        )
    examples_given = example_input if isinstance(example_input, tuple) else (example_input,)
    if example_input is not None and not all(isinstance(e, torch.Tensor) for e in examples_given):
        kinds = ", ".join(type(e).__name__ for e in examples_given)
        raise UnsupportedOptionError(f"example_input must be a torch.Tensor or a tuple of them, got {kinds}")

    is_quantizer = isinstance(model, QUANTIZERS)
    quantizers = {"": model} if is_quantizer else find_quantizers(model)
    if not quantizers:
        raise UnsupportedOptionError(
            f"{type(model).__name__} contains no vqdeploy VectorQuantize, ResidualVQ or GroupedResidualVQ"
        )
    _check_ready(quantizers)

    if index_dtype != "int64" and not (is_quantizer and part in ("encode", "quantize")):
        raise UnsupportedOptionError(
            f"index_dtype={index_dtype!r} applies to the indices output of a bare quantizer's encode or quantize part"
        )
    if is_quantizer and (dynamic_shapes is not None or input_names or output_names or verification_outputs):
        raise UnsupportedOptionError(
            "dynamic_shapes, input_names, output_names and verification_outputs apply to a whole model; a bare "
            f"{type(model).__name__} export has the fixed names and dynamic axes of its part"
        )
    codec_parts.check_n_q(model, part, n_q)
    axis_names: dict[int, str] = {}
    if is_quantizer and codec_parts.is_codec_kind(model):
        wrapper = PART_MODULES[part](model, n_q)
        example, dynamic, input_names, output_names, axis_names = codec_parts.export_spec(model, part, example_input)
    elif is_quantizer:
        wrapper = PART_MODULES[part](model, n_q)
        example = _example_input(model, part) if example_input is None else example_input
        dynamic = {"x" if part != "decode" else "indices": _dynamic_axes(model, part, example)}
        input_names, output_names = PART_INPUTS[part], PART_OUTPUTS[part]
    else:
        if part not in ("quantize", "model"):
            raise UnsupportedOptionError(
                f"part={part!r} applies to a bare quantizer; a model ({type(model).__name__}) is exported whole"
            )
        if example_input is None:
            raise UnsupportedOptionError(f"exporting a {type(model).__name__} needs example_input")
        wrapper, example = model, example_input
        examples = example if isinstance(example, tuple) else (example,)
        dynamic = whole_model.dynamic_spec(dynamic_shapes, examples)
        if input_names is None:
            input_names = [f"input_{i}" for i in range(len(examples))] if len(examples) > 1 else ["input"]
        elif len(input_names) != len(examples):
            raise UnsupportedOptionError(f"input_names has {len(input_names)} names for {len(examples)} inputs")
        part = "model"
    examples = example if isinstance(example, tuple) else (example,)

    modes = [(module, module.training) for module in model.modules()]  # each submodule's own mode
    model.eval()
    functions.register_schema()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                wrapper,
                examples,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic,
                custom_translation_table={torch.ops.vqdeploy.nearest_code.default: _nearest_code_translation},
                opset_version=opset,
                optimize=False,  # keep initializer names = state-dict keys (the torch backend reads them)
                verbose=False,
            )
        proto = program.model_proto
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {error}") from error
    finally:
        for module, training in modes:  # model.train(flag) would also flip a user's frozen (eval) parts
            module.training = training

    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter fell back to another opset: the metadata must not say otherwise
        raise ExportError(f"torch.onnx.export wrote opset {written} where opset {opset} was asked for")
    extra: dict[str, Any] = {}
    if not is_quantizer:  # before inlining: the NearestCode nodes name each search's rows
        proto, extra = whole_model.describe_export(model, quantizers, examples, proto, output_names,
                                                   verification_outputs, dynamic_shapes)
    proto = finish_model(proto, fused=fused)
    if index_dtype == "int32":
        cast_output(proto, "indices", onnx.TensorProto.INT32)
    if is_quantizer:
        proto = name_dynamic_dims(proto, axis_names or QuantizerSpec.from_module(model).dynamic_axis_names(part, examples[0].ndim))
    info = build_info(
        quantizers,
        kind=type(model).__name__ if is_quantizer else "model",
        part=part,
        fused=fused,
        opset=opset,
        inputs=[i.name for i in proto.graph.input],
        outputs=[o.name for o in proto.graph.output],
        **extra,
    )
    if n_q is not None:
        info = codec_parts.with_stages_used(info, n_q)
    write_metadata(proto, info)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported graph fails onnx.checker: {error}") from error
    return atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)), overwrite=overwrite)


def cast_output(proto: onnx.ModelProto, name: str, to: int) -> None:
    """Make graph output `name` of type `to`: its producer now writes `name`_wide, cast at the end."""
    wide = f"{name}_wide"
    for node in proto.graph.node:
        node.input[:] = [wide if value == name else value for value in node.input]
        node.output[:] = [wide if value == name else value for value in node.output]
    for value in proto.graph.value_info:
        if value.name == name:
            value.name = wide
    proto.graph.node.append(onnx.helper.make_node("Cast", [wide], [name], to=to, name=f"cast_{name}"))
    output = next(o for o in proto.graph.output if o.name == name)
    output.type.tensor_type.elem_type = to


def finish_model(proto: onnx.ModelProto, fused: bool) -> onnx.ModelProto:
    """Attach the NearestCode function (fused) or inline it (unfused); set the IR version."""
    functions.attach_function(proto)
    if not fused:
        proto = functions.inline_function(proto)
    proto.ir_version = IR_VERSION
    return proto


__all__ = ["IR_VERSION", "STATE_PREFIX", "export_onnx", "find_quantizers", "name_dynamic_dims"]
