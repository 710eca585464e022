"""The metadata a vqdeploy export carries (ONNX `metadata_props`): the keys, written and read here."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from vqdeploy.errors import NotAVQDeployModelError

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
    if not isinstance(model, onnx.ModelProto):
        name = str(model)
        path = Path(model)
        if not path.is_file():
            raise NotAVQDeployModelError(f"{path} does not exist")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # protobuf raises DecodeError and friends
            raise NotAVQDeployModelError(f"{path} is not an ONNX file: {error}") from error
    props = {p.key.removeprefix(PREFIX): p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    missing = [f for f in ExportInfo.__dataclass_fields__ if f not in props and f not in _OPTIONAL_FIELDS]
    if missing:
        raise NotAVQDeployModelError(
            f"{name} is not a vqdeploy export (no vqdeploy metadata{'' if len(missing) > 12 else ': missing ' + ', '.join(missing)}); "
            "write it with vqdeploy.export_onnx or `vqdeploy export`"
        )
    values: dict[str, Any] = {}
    for key in ExportInfo.__dataclass_fields__:
        if key not in props:
            continue
        raw = props[key]
        values[key] = json.loads(raw) if key in _JSON_FIELDS else int(raw) if key in _INT_FIELDS else raw
    return ExportInfo(**values)
