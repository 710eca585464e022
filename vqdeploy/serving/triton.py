"""An NVIDIA Triton Inference Server model repository for the onnxruntime backend.

Layout written for a model NAME::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.onnx

Tokens are Triton's batch axis. A vqdeploy export takes (batch, seq, dim) (or (batch, dim, seq),
(batch, dim, h, w)); Triton's dynamic batcher joins requests along the first axis only, and only
requests whose other axes agree, so requests of (1, 7, D) and (1, 300, D) could never share a
batch. The repository's graph is therefore a token-major variant of the export, (N, D) -> (N,)
(heads: (N, H); ResidualVQ: (N, Q)): a Transpose/Unsqueeze in front of the exported graph and a
Reshape behind it, the search itself untouched. A request is any number of token rows; Triton
concatenates requests of any lengths into one run of up to ``max_batch_size`` tokens, and each
token's index depends on that token alone, so batching cannot change a token.

What it does not give: inside Triton the graph runs on ONNX Runtime without vqdeploy's host-side
re-check, so its tokens carry the certified-tie guarantee (a differing token is a tie within the
float32 error bound), not identity with the eager model. On GPU the CUDA execution provider gets
``use_tf32=0`` (TF32 in its MatMul would change tokens); the onnxruntime backend passes every
parameter of its ``cuda`` accelerator to the provider's options unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from vqdeploy.errors import NotAVQDeployModelError, OutputExistsError, UnsupportedOptionError
from vqdeploy.export import functions
from vqdeploy.export.metadata import PREFIX, ExportInfo, read_metadata
from vqdeploy.runtime.base import default_chunk_size
from vqdeploy.spec import QuantizerSpec

# The ONNX Runtime that Triton's onnxruntime backend is built against in its current releases:
# build.py's DEFAULT_TRITON_VERSION_MAP went 1.24.4 (26.05) -> 1.27.0 (26.06) -> 1.28.0 -> 1.30.0
# (26.09). tools/triton_ort_check.py loads the repository's graph in this version.
TRITON_ORT_VERSION = "1.30.0"

INPUT_NAME = "x"
OUTPUT_NAME = "indices"
TOKEN_AXIS = "tokens"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.DOUBLE: "TYPE_FP64"}


def _check_exportable(info: ExportInfo, path: Path) -> None:
    if info.kind == "model":
        raise UnsupportedOptionError(f"{path} is a whole user model; a Triton repository takes a quantizer export")
    if info.part != "encode":
        raise UnsupportedOptionError(
            f"{path} holds part {info.part!r}; the Triton repository serves encode (x -> indices): "
            "export again with part='encode' (CLI: --part encode)"
        )


def _output_width(info: ExportInfo) -> int | None:
    """Indices per token beyond the token axis: Q for ResidualVQ, heads for multi-head, else None."""
    if QuantizerSpec.from_info(info).residual:
        return info.num_quantizers
    return info.heads if info.heads > 1 else None


def token_major_graph(model: onnx.ModelProto, info: ExportInfo) -> onnx.ModelProto:
    """The encode graph with input x[N, D] and output indices[N] ([N, H] heads, [N, Q] ResidualVQ).

    The exported graph sees the N tokens as one sequence of a batch of one, in its own layout.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    graph = proto.graph
    (old_input,) = [i for i in graph.input if i.name == info.inputs[0]]
    (old_output,) = [o for o in graph.output if o.name == info.outputs[-1]]
    inner_x, inner_indices = "vqdeploy_triton_x", "vqdeploy_triton_indices"
    for node in graph.node:
        node.input[:] = [inner_x if name == old_input.name else name for name in node.input]
        node.output[:] = [inner_indices if name == old_output.name else name for name in node.output]
    float_type = old_input.type.tensor_type.elem_type

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    layout = QuantizerSpec.from_info(info).layout
    front: list[onnx.NodeProto] = []
    if layout.channel_first and not layout.image:
        front += [helper.make_node("Transpose", [INPUT_NAME], ["vqdeploy_triton_xt"], perm=[1, 0]),
                  const("vqdeploy_triton_axes", [0]),
                  helper.make_node("Unsqueeze", ["vqdeploy_triton_xt", "vqdeploy_triton_axes"], [inner_x])]
    elif layout.image:
        front += [helper.make_node("Transpose", [INPUT_NAME], ["vqdeploy_triton_xt"], perm=[1, 0]),
                  const("vqdeploy_triton_axes", [0, 2]),
                  helper.make_node("Unsqueeze", ["vqdeploy_triton_xt", "vqdeploy_triton_axes"], [inner_x])]
    else:  # channel-last: (N, D) -> (1, N, D)
        front += [const("vqdeploy_triton_axes", [0]),
                  helper.make_node("Unsqueeze", [INPUT_NAME, "vqdeploy_triton_axes"], [inner_x])]

    width = _output_width(info)
    back: list[onnx.NodeProto] = []
    if QuantizerSpec.from_info(info).residual:  # (Q, 1, N) -> (Q, N) -> (N, Q)
        back += [const("vqdeploy_triton_shape", [info.num_quantizers, -1]),
                 helper.make_node("Reshape", [inner_indices, "vqdeploy_triton_shape"], ["vqdeploy_triton_qn"]),
                 helper.make_node("Transpose", ["vqdeploy_triton_qn"], [OUTPUT_NAME], perm=[1, 0])]
    else:  # (1, N[, H]) or (1, 1, N[, H]) -> (N[, H])
        back += [const("vqdeploy_triton_shape", [-1] if width is None else [-1, width]),
                 helper.make_node("Reshape", [inner_indices, "vqdeploy_triton_shape"], [OUTPUT_NAME])]

    nodes = [*front, *graph.node, *back]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, float_type, [TOKEN_AXIS, info.dim]))
    del graph.output[:]
    out_shape = [TOKEN_AXIS] if width is None else [TOKEN_AXIS, width]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.INT64, out_shape))
    del graph.value_info[:]  # shapes of the old batch/seq symbols; ORT infers them again
    _mark_token_major(proto)
    functions.register_schema()
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _mark_token_major(proto: onnx.ModelProto) -> None:
    """Metadata says what the file now takes: token rows, input x and output indices."""
    for prop in proto.metadata_props:
        if prop.key == PREFIX + "input_layout":
            prop.value = "n d"
        elif prop.key == PREFIX + "inputs":
            prop.value = f'["{INPUT_NAME}"]'
        elif prop.key == PREFIX + "outputs":
            prop.value = f'["{OUTPUT_NAME}"]'
    proto.metadata_props.append(onnx.StringStringEntryProto(key=PREFIX + "triton", value="token-major (N, D) -> indices"))


def triton_config(
    name: str,
    info: ExportInfo,
    float_type: int,
    *,
    max_batch_size: int,
    instances: int = 1,
    gpu: bool = False,
    intra_op_threads: int = 0,
    max_queue_delay_us: int = 1000,
) -> str:
    """config.pbtxt text for the token-major graph (text format of Triton's ModelConfig protobuf)."""
    width = _output_width(info)
    # A batched output needs at least one dim of its own: [1], reshaped away, for one index per token.
    output_dims = "dims: [ 1 ]\n    reshape: { shape: [ ] }" if width is None else f"dims: [ {width} ]"
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}  # tokens per run: requests of any lengths are joined up to this",
        "input [",
        "  {",
        f'    name: "{INPUT_NAME}"',
        f"    data_type: {_TRITON_TYPES[float_type]}",
        f"    dims: [ {info.dim} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{OUTPUT_NAME}"',
        "    data_type: TYPE_INT64",
        f"    {output_dims}",
        "  }",
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}",
        "  }",
        "]",
    ]
    if gpu:
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator: [",
            "      {",
            '        name: "cuda"',
            '        parameters { key: "use_tf32" value: "0" }  # TF32 in MatMul would change tokens',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    lines += [
        f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{intra_op_threads}" }} }}',
        # The graph is one chain of ops: nothing to run side by side.
        'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }',
    ]
    return "\n".join(lines) + "\n"


def write_triton_repository(
    model: str | os.PathLike,
    repository: str | os.PathLike,
    *,
    name: str | None = None,
    max_batch_size: int | None = None,
    instances: int = 1,
    gpu: bool = False,
    intra_op_threads: int = 0,
    max_queue_delay_us: int = 1000,
    force: bool = False,
) -> Path:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx for Triton's onnxruntime backend.

    `model` is a vqdeploy export of part "encode". max_batch_size: tokens per run (default: the
    chunk `vqdeploy.runtime` uses for this codebook on ONNX Runtime, a chunk's scores near 8 MiB).
    instances: model instances (each an ORT session); gpu: KIND_GPU with TF32 off, else KIND_CPU;
    intra_op_threads: threads per instance (0: ONNX Runtime's default, one per core). An existing
    REPO/NAME is replaced only with ``force=True``; other models in REPO are left alone. Returns
    the model folder.

    >>> import tempfile, pathlib, vqdeploy
    >>> from vqdeploy.serving import write_triton_repository
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> vq = vqdeploy.VectorQuantize(dim=8, codebook_size=16).eval()
    >>> onnx_path = vqdeploy.export_onnx(vq, tmp / "vq.onnx", part="encode")
    >>> sorted(p.relative_to(tmp / "repo").as_posix() for p in write_triton_repository(onnx_path, tmp / "repo").rglob("*"))
    ['vq/1', 'vq/1/model.onnx', 'vq/config.pbtxt']
    """
    source = Path(model)
    info = read_metadata(source)
    _check_exportable(info, source)
    name = source.stem if name is None else name
    if not _NAME.fullmatch(name):
        raise UnsupportedOptionError(f"model name must be letters, digits, '_', '.' or '-', got {name!r}")
    max_batch_size = default_chunk_size(info) if max_batch_size is None else max_batch_size
    for value, what, least in ((max_batch_size, "max_batch_size", 1), (instances, "instances", 1),
                               (intra_op_threads, "intra_op_threads", 0), (max_queue_delay_us, "max_queue_delay_us", 0)):
        if value < least:
            raise UnsupportedOptionError(f"{what} must be >= {least}, got {value}")
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise OutputExistsError(f"{repository} exists and is not a directory; a model repository is a directory")
    target = repository / name
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputExistsError(f"{target} is a file or a symbolic link, not a model folder; it is never replaced: "
                                "choose another name or repository")
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass force=True (CLI: --force) to replace it")

    try:
        proto = onnx.load(str(source))
    except Exception as error:  # protobuf's DecodeError and friends
        raise NotAVQDeployModelError(f"{source} is not a readable ONNX file: {error}") from error
    graph = token_major_graph(proto, info)
    float_type = graph.graph.input[0].type.tensor_type.elem_type
    config = triton_config(name, info, float_type, max_batch_size=max_batch_size, instances=instances, gpu=gpu,
                           intra_op_threads=intra_op_threads, max_queue_delay_us=max_queue_delay_us)

    # Build next to the target, then swap it in: a failure leaves no half-written model behind.
    repository.mkdir(parents=True, exist_ok=True)
    staging = repository / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        onnx.save(graph, str(staging / "1" / "model.onnx"))
        (staging / "config.pbtxt").write_text(config)
        if target.exists():
            old = repository / f".{name}.old-{os.getpid()}"
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = ["TRITON_ORT_VERSION", "token_major_graph", "triton_config", "write_triton_repository"]
