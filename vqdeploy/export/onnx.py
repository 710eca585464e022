"""export_onnx: a quantizer (encode / decode / quantize) or a model around it, to one ONNX file."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim

from vqdeploy.errors import (
    ExportError,
    UninitializedCodebookError,
    UnsupportedOptionError,
)
from vqdeploy.export import functions
from vqdeploy.export.metadata import (
    PART_INPUTS,
    PART_OUTPUTS,
    PARTS,
    STATE_PREFIX,
    build_info,
    write_metadata,
)
from vqdeploy.files import atomic_write, check_output_path
from vqdeploy.nn import ResidualVQ, VectorQuantize
from vqdeploy.nn.conventions import SEED, residual_indices_from_seed, residual_indices_to_seed
from vqdeploy.spec import QuantizerSpec

IR_VERSION = 10  # ONNX Runtime >= 1.20 loads it; onnx 1.23 would write 14 by default
DEFAULT_OPSET = 18
# The newest opset torch's exporter writes natively (newer ones go through onnxscript's version
# converter, which fails on this graph) and ONNX Runtime loads.
MAX_OPSET = 23
INDEX_DTYPES = ("int64", "int32")


class _Encode(nn.Module):
    """The graph of one part. A bare ResidualVQ's graph takes and returns indices (q, b, n) whatever
    the module's conventions; `vqdeploy.runtime` hands them over in the module's layout."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer
        self.conventions = getattr(quantizer, "conventions", SEED) if isinstance(quantizer, ResidualVQ) else SEED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return residual_indices_to_seed(self.conventions, self.quantizer(x)[1])


class _Quantize(_Encode):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, indices, _ = self.quantizer(x)[:3]
        return vectors, residual_indices_to_seed(self.conventions, indices)


class _Decode(_Encode):
    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.quantizer.get_output_from_indices(residual_indices_from_seed(self.conventions, indices))


PART_MODULES = {"encode": _Encode, "quantize": _Quantize, "decode": _Decode}


def find_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> VectorQuantize / ResidualVQ inside `model` (stages of a ResidualVQ not listed)."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, VectorQuantize | ResidualVQ) and not any(path.startswith(p + ".") for p in found if p):
            found[path] = module
    return found


def _example_input(quantizer: nn.Module, part: str) -> torch.Tensor:
    """A small input with sizes >= 2 on every dynamic axis (torch.export specialises sizes 0 and 1)."""
    return QuantizerSpec.from_module(quantizer).example_input(part)


def _dynamic_axes(quantizer: nn.Module, part: str, example: torch.Tensor) -> dict[int, object]:
    """Batch and sequence (or height and width) axes of the part's input."""
    return dict.fromkeys(QuantizerSpec.from_module(quantizer).dynamic_axis_names(part, example.ndim), Dim.DYNAMIC)


_SYMBOL = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


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
            if isinstance(module, VectorQuantize) and not bool(module._codebook.initted):
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
) -> Path:
    """Export a quantizer, or a model that contains quantizers, to an ONNX file at `path`.

    For a bare VectorQuantize / ResidualVQ, `part` picks ``"encode"`` (x -> indices),
    ``"decode"`` (indices -> vectors) or ``"quantize"`` (x -> vectors, indices). Any other module
    is exported whole (its forward) and needs `example_input`. Batch and sequence axes (image:
    batch, height, width) are dynamic. With ``fused=True`` every nearest-code search is one
    ``vqdeploy::NearestCode`` node backed by a model-local function; with ``fused=False`` the same
    computation is inlined in standard ops. ``index_dtype="int32"`` (encode and quantize of a bare
    quantizer) makes the indices output int32: one Cast at the end of the graph, for runtimes
    such as TensorRT where an INT64 output costs casts of its own. Returns the path written.

    >>> import tempfile, pathlib, vqdeploy
    >>> vq = vqdeploy.VectorQuantize(dim=8, codebook_size=16)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "vq.onnx"
    >>> export_onnx(vq, out, part="encode").name
    'vq.onnx'
    """
    path = check_output_path(path, overwrite)  # refused before the export's work, and again at the write
    if part not in PARTS:
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

    is_quantizer = isinstance(model, VectorQuantize | ResidualVQ)
    quantizers = {"": model} if is_quantizer else find_quantizers(model)
    if not quantizers:
        raise UnsupportedOptionError(f"{type(model).__name__} contains no vqdeploy VectorQuantize or ResidualVQ")
    _check_ready(quantizers)

    if index_dtype != "int64" and not (is_quantizer and part in ("encode", "quantize")):
        raise UnsupportedOptionError(
            f"index_dtype={index_dtype!r} applies to the indices output of a bare quantizer's encode or quantize part"
        )
    if is_quantizer:
        wrapper = PART_MODULES[part](model)
        example = _example_input(model, part) if example_input is None else example_input
        dynamic = {"x" if part != "decode" else "indices": _dynamic_axes(model, part, example)}
        input_names, output_names = PART_INPUTS[part], PART_OUTPUTS[part]
    else:
        if part != "quantize":
            raise UnsupportedOptionError(
                f"part={part!r} applies to a bare quantizer; a model ({type(model).__name__}) is exported whole"
            )
        if example_input is None:
            raise UnsupportedOptionError(f"exporting a {type(model).__name__} needs example_input")
        wrapper, example = model, example_input
        examples = example if isinstance(example, tuple) else (example,)
        dynamic = tuple({axis: Dim.AUTO for axis in range(t.ndim)} for t in examples)
        input_names = [f"input_{i}" for i in range(len(examples))] if len(examples) > 1 else ["input"]
        output_names = None
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
    proto = finish_model(proto, fused=fused)
    if index_dtype == "int32":
        cast_output(proto, "indices", onnx.TensorProto.INT32)
    if is_quantizer:
        proto = name_dynamic_dims(proto, QuantizerSpec.from_module(model).dynamic_axis_names(part, examples[0].ndim))
    info = build_info(
        quantizers,
        kind=type(model).__name__ if is_quantizer else "model",
        part=part,
        fused=fused,
        opset=opset,
        inputs=[i.name for i in proto.graph.input],
        outputs=[o.name for o in proto.graph.output],
    )
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
