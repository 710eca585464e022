"""The metadata a vqdeploy export carries (ONNX `metadata_props`): the keys, written and read here."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from vqdeploy.errors import ExternalDataError, MetadataError, ModelValuesError, NotAVQDeployModelError

PREFIX = "vqdeploy."
PARTS = ("encode", "decode", "quantize")
# The file's inputs and outputs by part; a user model keeps the names torch gives its forward.
PART_INPUTS = {"encode": ["x"], "quantize": ["x"], "decode": ["indices"]}
PART_OUTPUTS = {"encode": ["indices"], "quantize": ["vectors", "indices"], "decode": ["vectors"]}
STATE_PREFIX = "quantizer."  # initializers of a bare-quantizer export are named STATE_PREFIX + state-dict key


@dataclass(frozen=True)
class ExportInfo:
    """What a vqdeploy ONNX file holds. `quantizers` lists every quantizer found in the model."""

    version: str
    part: str
    kind: str  # "VectorQuantize", "ResidualVQ", "GroupedResidualVQ", or "model" for a user model with quantizers
    num_quantizers: int
    codebook_size: int
    dim: int
    codebook_dim: int
    heads: int
    metric: str  # "l2" or "cosine"
    input_layout: str
    index_dtype: str
    fused: bool
    opset: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # constructor config of a bare quantizer
    quantizers: list[dict[str, Any]] = field(default_factory=list)
    # Whole models (kind "model"); absent from files written before, read as empty.
    searches: list[dict[str, Any]] = field(default_factory=list)  # every NearestCode node, in graph order
    input_shapes: list[list[Any]] = field(default_factory=list)  # per input: sizes, or names of dynamic axes
    example_shapes: list[list[int]] = field(default_factory=list)  # the example_input export traced
    verification_outputs: bool = False  # whether each search's rows and tokens are graph outputs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_quantizer(module: nn.Module) -> dict[str, Any]:
    """Kind, sizes and metric of one quantizer (VectorQuantize, ResidualVQ, GroupedResidualVQ, or a codec kind): its I/O spec (`vqdeploy.spec`)
    plus what the search needs."""
    config = dict(module.config)
    return dict(
        **module.spec.metadata_fields(),
        codebook_dim=module.codebook_dim,
        metric="cosine" if config.get("use_cosine_sim") else "l2",
        config=config,
    )


def build_info(
    quantizers: dict[str, nn.Module], kind: str, part: str, fused: bool, opset: int, inputs: list[str], outputs: list[str],
    quantizer_fields: dict[str, dict[str, Any]] | None = None, **model_fields: Any,
) -> ExportInfo:
    """ExportInfo for an export of `part`; `quantizers` maps module paths to the quantizers inside."""
    from vqdeploy._version import __version__

    described = [dict(path=path, **describe_quantizer(q), **(quantizer_fields or {}).get(path, {}))
                 for path, q in quantizers.items()]
    first = described[0]
    return ExportInfo(
        version=__version__,
        part=part,
        kind=kind,
        num_quantizers=first["num_quantizers"],
        codebook_size=first["codebook_size"],
        dim=first["dim"],
        codebook_dim=first["codebook_dim"],
        heads=first["heads"],
        metric=first["metric"],
        input_layout=first["input_layout"] if kind != "model" else "model",
        index_dtype="int64",
        fused=fused,
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        config=first["config"] if kind != "model" else {},
        quantizers=described,
        **model_fields,
    )


_JSON_FIELDS = ("inputs", "outputs", "config", "quantizers", "fused", "searches", "input_shapes", "example_shapes",
                "verification_outputs")
# Fields added after the first files were written: optional when reading (their defaults).
_OPTIONAL_FIELDS = ("searches", "input_shapes", "example_shapes", "verification_outputs")
_INT_FIELDS = ("num_quantizers", "codebook_size", "dim", "codebook_dim", "heads", "opset")


def write_metadata(model: onnx.ModelProto, info: ExportInfo) -> None:
    """Store `info` in the model's metadata_props, one key per field."""
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in info.as_dict().items():
        text = json.dumps(value) if key in _JSON_FIELDS else str(value)
        model.metadata_props.append(onnx.StringStringEntryProto(key=PREFIX + key, value=text))


def read_metadata(model: onnx.ModelProto | bytes | str | os.PathLike) -> ExportInfo:
    """The ExportInfo of a vqdeploy export (a path, the file's bytes, or a loaded model);
    `NotAVQDeployModelError` for any other ONNX file."""
    name = "model"
    if isinstance(model, bytes | bytearray | memoryview):
        name = f"the {len(model)} bytes given"
        try:
            model = onnx.load_model_from_string(bytes(model))
        except Exception as error:  # protobuf raises DecodeError and friends
            raise NotAVQDeployModelError(f"{name} are not an ONNX file: {error}") from error
        check_external_data(model, None, name)
    if not isinstance(model, onnx.ModelProto):
        name = str(model)
        path = Path(model)
        if not path.is_file():
            raise NotAVQDeployModelError(f"{path} does not exist")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # protobuf raises DecodeError and friends
            raise NotAVQDeployModelError(f"{path} is not an ONNX file: {error}") from error
        check_external_data(model, path.parent, name)
    props = {p.key.removeprefix(PREFIX): p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    missing = [f for f in ExportInfo.__dataclass_fields__ if f not in props and f not in _OPTIONAL_FIELDS]
    if missing:
        raise NotAVQDeployModelError(
            f"{name} is not a vqdeploy export (no vqdeploy metadata{'' if len(missing) > 12 else ': missing ' + ', '.join(missing)}); "
            "write it with vqdeploy.export_onnx or `vqdeploy export`"
        )
    values = _parse_fields(props, name)
    info = ExportInfo(**values)
    check_info(info, model, name)
    check_finite_weights(model, name)
    return info


def check_finite_weights(model: onnx.ModelProto, name: str) -> None:
    """Raise `ModelValuesError` when a float initializer held in the file is NaN or infinite (a NaN code
    is never the nearest, so every backend would break the tie it makes its own way)."""
    for initializer in model.graph.initializer:
        if initializer.data_location == onnx.TensorProto.EXTERNAL or initializer.data_type not in _FLOAT_TENSOR_TYPES:
            continue
        values = numpy_helper.to_array(initializer)
        if values.size and not np.isfinite(values.astype(np.float32, copy=False)).all():
            bad = int((~np.isfinite(values.astype(np.float32, copy=False))).sum())
            raise ModelValuesError(
                f"{name}: weight {initializer.name!r} {tuple(values.shape)} holds {bad} NaN/Inf value(s); "
                "export the model again from finite weights"
            )


_FLOAT_TENSOR_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


TOKEN_MAJOR_LAYOUT = "n d"
_JSON_TYPES = {"inputs": list, "outputs": list, "config": dict, "quantizers": list, "fused": bool, "searches": list,
               "input_shapes": list, "example_shapes": list, "verification_outputs": bool}
KINDS = ("VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "SplitResidualVQ", "FactorizedResidualVQ", "model")
METRICS = ("l2", "cosine")
INDEX_DTYPES = ("int64", "int32")


def _parse_fields(props: dict[str, str], name: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in ExportInfo.__dataclass_fields__:
        if key not in props:
            continue
        raw = props[key]
        if key in _JSON_FIELDS:
            try:
                value = json.loads(raw)
            except ValueError as error:
                raise MetadataError(f"{name}: metadata field {key!r} is not valid JSON ({raw[:40]!r})") from error
            if not isinstance(value, _JSON_TYPES[key]):
                raise MetadataError(f"{name}: metadata field {key!r} must be a JSON {_JSON_TYPES[key].__name__}, "
                                    f"got {raw[:40]!r}")
        elif key in _INT_FIELDS:
            try:
                value = int(raw)
            except ValueError as error:
                raise MetadataError(f"{name}: metadata field {key!r} must be an integer, got {raw[:40]!r}") from error
            if value < 1:
                raise MetadataError(f"{name}: metadata field {key!r} must be >= 1, got {value}")
        else:
            value = raw
        values[key] = value
    return values


def _choice(name: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MetadataError(f"{name}: metadata field {key!r} must be one of {', '.join(allowed)}, got {value!r}")


def check_info(info: ExportInfo, model: onnx.ModelProto, name: str = "model") -> None:
    """Refuse metadata that is out of range or disagrees with itself or with the graph
    (`MetadataError`): a runtime shapes its tensors from these fields, so none is trusted unchecked."""
    from vqdeploy.spec import LAYOUTS

    _choice(name, "part", info.part, (*PARTS, "model") if info.kind == "model" else PARTS)
    _choice(name, "kind", info.kind, KINDS)
    _choice(name, "metric", info.metric, METRICS)
    _choice(name, "index_dtype", info.index_dtype, INDEX_DTYPES)
    # "n d": the token-major graph of a Triton model repository (vqdeploy.serving.triton)
    _choice(name, "input_layout", info.input_layout,
            ("model",) if info.kind == "model" else (*LAYOUTS, TOKEN_MAJOR_LAYOUT))
    if not all(isinstance(v, str) for v in (*info.inputs, *info.outputs)):
        raise MetadataError(f"{name}: metadata fields 'inputs' and 'outputs' must list names")
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    graph_outputs = [o.name for o in model.graph.output]
    if info.inputs != graph_inputs or info.outputs != graph_outputs:
        raise MetadataError(f"{name}: the metadata lists inputs {info.inputs} and outputs {info.outputs}; the graph has "
                            f"{graph_inputs} and {graph_outputs}")
    declared = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if declared != info.opset:
        raise MetadataError(f"{name}: the metadata says opset {info.opset}; the graph imports opset {declared}")
    if info.kind == "model":
        return
    _check_quantizer_fields(info, model, name)


def _check_quantizer_fields(info: ExportInfo, model: onnx.ModelProto, name: str) -> None:
    from vqdeploy.spec import LAYOUTS, layout_for

    config = info.config
    sizes = config.get("codebook_size")
    largest = max(sizes) if isinstance(sizes, list | tuple) and sizes else sizes
    expected = dict(dim=info.dim, codebook_size=(info.codebook_size, largest))
    if info.kind in ("VectorQuantize", "ResidualVQ", "GroupedResidualVQ"):
        expected["codebook_dim"] = (info.codebook_dim, config.get("codebook_dim") or info.codebook_dim)
    wrong = [f"{key}={pair[0]} (config: {pair[1]!r})" for key, pair in
             ((k, v if isinstance(v, tuple) else (v, config.get(k))) for k, v in expected.items()) if pair[0] != pair[1]]
    if wrong:
        raise MetadataError(f"{name}: metadata fields disagree with the stored config: {', '.join(wrong)}")
    stages = config.get("num_quantizers", 1)
    if info.kind != "VectorQuantize" and "num_quantizers" not in config:
        raise MetadataError(f"{name}: kind {info.kind!r} but the stored config has no num_quantizers (a VectorQuantize's?)")
    if info.kind == "VectorQuantize":
        if info.num_quantizers != 1 or config.get("heads", 1) != info.heads:
            raise MetadataError(f"{name}: a VectorQuantize has num_quantizers 1 and the config's heads; the metadata says "
                                f"num_quantizers {info.num_quantizers}, heads {info.heads}")
    else:
        if info.heads != 1:
            raise MetadataError(f"{name}: a {info.kind} has heads 1, the metadata says {info.heads}")
        most = stages * config.get("groups", 1)
        if not 1 <= info.num_quantizers <= most:  # fewer where n_q was baked into the export
            raise MetadataError(f"{name}: num_quantizers {info.num_quantizers} outside [1, {most}] of the config")
    if (info.metric == "cosine") != bool(config.get("use_cosine_sim", False)) and info.kind != "FactorizedResidualVQ":
        raise MetadataError(f"{name}: metadata metric {info.metric!r} disagrees with the config's use_cosine_sim")
    if info.kind == "VectorQuantize":
        layout = layout_for(config.get("channel_last", True), config.get("accept_image_fmap", False),
                            config.get("accept_3d_fmap", False)).name
    elif info.kind in ("ResidualVQ", "GroupedResidualVQ"):
        layout = layout_for(config.get("channel_last", True), image=False).name
    else:
        layout = info.input_layout  # the codec kinds take (batch, dim, time)
    if info.input_layout not in (layout, TOKEN_MAJOR_LAYOUT):
        raise MetadataError(f"{name}: metadata input_layout {info.input_layout!r} disagrees with the config ({layout!r})")
    if info.kind != "FactorizedResidualVQ":  # its codebooks are plain weights of per-stage code dims
        embeds = [i for i in model.graph.initializer if i.name.startswith(STATE_PREFIX) and i.name.endswith("_codebook.embed")]
        if not embeds:
            raise MetadataError(f"{name}: no codebook initializer ({STATE_PREFIX}..._codebook.embed) in the graph")
        books = info.heads if config.get("separate_codebook_per_head") else 1
        for embed in embeds:
            shape = tuple(embed.dims)
            if len(shape) != 3 or shape[0] != books or not 1 <= shape[1] <= info.codebook_size \
                    or shape[2] != info.codebook_dim:
                raise MetadataError(f"{name}: the codebook {embed.name} is {shape}; the metadata means "
                                    f"{(books, info.codebook_size, info.codebook_dim)}")
    graph_input = model.graph.input[0].type.tensor_type.shape.dim
    axis = -1 if info.input_layout == TOKEN_MAJOR_LAYOUT else LAYOUTS[info.input_layout].feature_axis
    if info.part != "decode" and graph_input and graph_input[axis].HasField("dim_value"):
        if graph_input[axis].dim_value != info.dim:
            raise MetadataError(f"{name}: the graph's input has dim {graph_input[axis].dim_value}; the metadata says "
                                f"{info.dim}")


def check_external_data(model: onnx.ModelProto, folder: Path | None, name: str) -> None:
    """Refuse external-data references that leave the model's folder, or that a model given as bytes
    cannot have (`ExternalDataError`)."""
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if folder is None:
            raise ExternalDataError(f"{name}: tensor {tensor.name} keeps its data in an external file ({location!r}); "
                                    "load the model from its file, not from bytes")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder.resolve()):
            raise ExternalDataError(f"{name}: tensor {tensor.name} points to external data {location!r} outside the "
                                    f"model's folder {folder}; refused")
        if not target.is_file():
            raise ExternalDataError(f"{name}: tensor {tensor.name}'s external data {location!r} does not exist")


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
