"""What a whole-model export adds to the graph and the metadata: which axes are fixed, what each
output is called, which output holds each quantizer's tokens, and one entry per search.

A search is one ``vqdeploy::NearestCode`` node; its first input is exactly the rows the search
saw, its output the tokens. `describe_export` matches the nodes, in graph order, with the searches
the eager forward makes (`vqdeploy.export.searches.record_searches`) and names both in the
metadata (``searches``: ``rows_value`` / ``tokens_value`` are the values in the graph,
``rows_output`` / ``tokens_output`` the graph outputs a verification variant gives them).
`with_search_outputs` makes that variant: an Identity per value, added as a graph output.
"""

from __future__ import annotations

import re
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.export import Dim
from torch.utils import _pytree

from vqdeploy.errors import NotAVQDeployModelError, UnsupportedOptionError
from vqdeploy.export.functions import nearest_code_nodes
from vqdeploy.export.searches import find_token_layout, record_searches, search_label

STATIC = ("static", False)


def dynamic_spec(dynamic_shapes: Any, examples: tuple[torch.Tensor, ...]) -> Any:
    """The dynamic_shapes torch.export gets: None -> every axis dynamic; False / "static" -> none;
    else the user's spec with each named axis ("batch") made dynamic (the names are put back on
    the graph inputs by `name_input_axes`)."""
    if dynamic_shapes is None:
        return tuple({axis: Dim.AUTO for axis in range(t.ndim)} for t in examples)
    if any(dynamic_shapes is s for s in STATIC) or dynamic_shapes == "static":
        return None

    def convert(spec: Any) -> Any:
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise UnsupportedOptionError(f"dynamic_shapes: expected one {{axis: name}} dict per input, got {spec!r}")
        return {axis: Dim.DYNAMIC if isinstance(name, str) else name for axis, name in spec.items()}

    if isinstance(dynamic_shapes, dict):
        return {key: convert(value) for key, value in dynamic_shapes.items()}
    if isinstance(dynamic_shapes, list | tuple):
        if len(dynamic_shapes) != len(examples):
            raise UnsupportedOptionError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(examples)} inputs (one dict per input)"
            )
        return tuple(convert(spec) for spec in dynamic_shapes)
    raise UnsupportedOptionError(
        f"dynamic_shapes must be None, False, 'static', a tuple of {{axis: name}} dicts or a dict of them, "
        f"got {type(dynamic_shapes).__name__}"
    )


def _axis_names(dynamic_shapes: Any, input_count: int) -> list[dict[int, str]]:
    names: list[dict[int, str]] = [{} for _ in range(input_count)]
    if isinstance(dynamic_shapes, list | tuple):
        for i, spec in enumerate(dynamic_shapes):
            if isinstance(spec, dict):
                names[i] = {axis: name for axis, name in spec.items() if isinstance(name, str)}
    elif isinstance(dynamic_shapes, dict) and not isinstance(dynamic_shapes, str):
        for i, spec in enumerate(dynamic_shapes.values()):
            if isinstance(spec, dict) and i < input_count:
                names[i] = {axis: name for axis, name in spec.items() if isinstance(name, str)}
    return names


# A bare dimension symbol of the exporter ("s77"), as it appears inside shape expressions too.
DIM_SYMBOL = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def name_input_axes(proto: onnx.ModelProto, names: list[dict[int, str]]) -> None:
    """Give the exporter's symbols on the inputs' named axes the user's names, everywhere."""
    mapping: dict[str, str] = {}
    for value, axes in zip(proto.graph.input, names, strict=False):
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims) and DIM_SYMBOL.fullmatch(dims[axis].dim_param or "") and dims[axis].dim_param not in mapping:
                mapping[dims[axis].dim_param] = name
    if not mapping:
        return
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = DIM_SYMBOL.sub(lambda m: mapping.get(m.group(0), m.group(0)), dim.dim_param)


def rename_value(proto: onnx.ModelProto, old: str, new: str) -> None:
    """Rename value ``old`` of the main graph to ``new`` in every node, output and value_info."""
    for node in proto.graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for value in (*proto.graph.output, *proto.graph.value_info):
        if value.name == old:
            value.name = new


def _shape(value: onnx.ValueInfoProto) -> list[Any]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def describe_export(
    model: nn.Module, quantizers: dict[str, nn.Module], examples: tuple[torch.Tensor, ...], proto: onnx.ModelProto,
    output_names: list[str] | None, verification_outputs: bool, dynamic_shapes: Any = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Name the outputs, find each quantizer's tokens output and each search's node; returns the
    graph and the metadata fields (`vqdeploy.export.metadata.build_info`'s keyword arguments)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), record_searches(model, quantizers) as recording:
            outputs = model(*examples)
    finally:
        for module, training in modes:
            module.training = training
    name_input_axes(proto, _axis_names(dynamic_shapes, len(examples)))
    leaves = [leaf for leaf in _pytree.tree_flatten(outputs)[0] if isinstance(leaf, torch.Tensor)]
    graph_outputs = list(proto.graph.output)
    fields: dict[str, dict[str, Any]] = {path: {} for path in quantizers}

    # Which output holds each quantizer's tokens (its first call's), and in which axis order.
    holders: dict[int, str] = {}
    if len(leaves) == len(graph_outputs):
        for call in recording.calls:
            if call.call != 0 or call.indices is None:
                continue
            for j, leaf in enumerate(leaves):
                order = find_token_layout(call.indices, leaf)
                if order is not None and j not in holders:
                    holders[j] = call.quantizer
                    fields[call.quantizer].update(tokens_axes=order, tokens_output_index=j)
                    break
    if output_names is None and len(leaves) == len(graph_outputs):
        taken = {v for node in proto.graph.node for v in (*node.input, *node.output)} | {
            i.name for i in proto.graph.initializer} | {i.name for i in proto.graph.input}
        several = len(quantizers) > 1
        for j, value in enumerate(graph_outputs):
            if j in holders:
                path = holders[j]
                wanted = f"{path or 'model'}.tokens" if several else "tokens"
            else:
                wanted = "output" if len(graph_outputs) - len(holders) == 1 else f"output_{j}"
            new = _unique(wanted, taken - {value.name})
            if new != value.name:
                rename_value(proto, value.name, new)
            taken.add(new)
    for entry in fields.values():
        if "tokens_output_index" in entry:
            entry["tokens_output"] = proto.graph.output[entry.pop("tokens_output_index")].name
        else:
            entry.update(tokens_output=None, tokens_axes=None)

    # One entry per search, matched with the NearestCode nodes in graph order.
    nodes = nearest_code_nodes(proto)
    searches: list[dict[str, Any]] = []
    if len(nodes) == len(recording.searches):
        calls = {path: max((c.call for c in recording.calls if c.quantizer == path), default=0) + 1 for path in quantizers}
        for number, (node, search) in enumerate(zip(nodes, recording.searches, strict=True)):
            quantizer = quantizers[search.quantizer]
            label = search_label(quantizer, search.search)
            prefix = search.quantizer or "model"
            if calls[search.quantizer] > 1:
                prefix += f".call{search.call}"
            ident = prefix + ("" if label == "codebook" else "." + label.replace(" ", ""))
            searches.append(dict(
                id=ident, number=number, quantizer=search.quantizer, call=search.call, search=search.search,
                label=label, codebook_size=int(search.codebook.shape[0]), dim=int(search.codebook.shape[1]),
                node=node.name, rows_value=node.input[0], tokens_value=node.output[0],
                rows_output=f"search.{ident}.rows", tokens_output=f"search.{ident}.tokens",
            ))
        for path in quantizers:
            fields[path]["searches"] = [s["id"] for s in searches if s["quantizer"] == path]
            fields[path]["stages"] = sum(1 for s in searches if s["quantizer"] == path and s["call"] == 0)
    if verification_outputs and searches:
        proto = with_search_outputs(proto, searches)
    extra = dict(
        quantizer_fields=fields,
        searches=searches,
        input_shapes=[_shape(value) for value in proto.graph.input],
        example_shapes=[list(t.shape) for t in examples],
        verification_outputs=bool(verification_outputs and searches),
    )
    return proto, extra


def with_search_outputs(proto: onnx.ModelProto, searches: list[dict[str, Any]]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph also outputs every search's rows and tokens (output names
    from the metadata's ``searches``).

    The values are read off the graph as it is, not off the metadata: in a fused file the k-th
    NearestCode node's first input and output (so a graph whose search was rewired shows the rows
    it really searches); in an unfused file, where the searches are inlined, the values the
    metadata names. Outputs of those names already in the file are rebuilt the same way.
    """
    names = {name for s in searches for name in (s["rows_output"], s["tokens_output"])}
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    kept_outputs = [o for o in proto.graph.output if o.name not in names]
    del proto.graph.output[:]
    proto.graph.output.extend(kept_outputs)
    kept_nodes = [n for n in proto.graph.node if not (n.op_type == "Identity" and set(n.output) & names)]
    del proto.graph.node[:]
    proto.graph.node.extend(kept_nodes)
    nodes = nearest_code_nodes(proto)
    if nodes and len(nodes) != len(searches):
        raise NotAVQDeployModelError(
            f"the graph has {len(nodes)} NearestCode nodes, its metadata describes {len(searches)} searches: "
            "the file was changed after export"
        )
    values = {v for node in proto.graph.node for v in node.output}
    for k, search in enumerate(searches):
        rows, tokens = (nodes[k].input[0], nodes[k].output[0]) if nodes else (search["rows_value"], search["tokens_value"])
        for value, output, elem in ((rows, search["rows_output"], TensorProto.FLOAT),
                                    (tokens, search["tokens_output"], TensorProto.INT64)):
            if value not in values:
                raise NotAVQDeployModelError(
                    f"the graph has no value {value!r} ({search['id']}'s {'rows' if elem == TensorProto.FLOAT else 'tokens'}"
                    "), which its metadata names: the file was changed after export"
                )
            shape = [f"{search['id']}.M", search["dim"]] if elem == TensorProto.FLOAT else [f"{search['id']}.M"]
            proto.graph.node.append(helper.make_node("Identity", [value], [output], name=f"verify_{output}"))
            proto.graph.output.append(helper.make_tensor_value_info(output, elem, shape))
    return proto


__all__ = ["describe_export", "dynamic_spec", "name_input_axes", "rename_value", "with_search_outputs"]
