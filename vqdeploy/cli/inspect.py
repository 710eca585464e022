"""`vqdeploy inspect`: what an export holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vqdeploy.cli.common import existing_file
from vqdeploy.cli.output import format_table

NAME = "inspect"
HELP = "Show what a vqdeploy ONNX file holds."
EPILOG = """\
examples:
  vqdeploy inspect vq.onnx            # metadata, graph inputs/outputs, NearestCode nodes
  vqdeploy inspect vq.onnx --json     # the same as JSON
"""


def _value_info(value) -> dict[str, Any]:
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
    return {"name": value.name, "dtype": dtype, "shape": shape}


def describe_onnx(path: Path) -> dict[str, Any]:
    """What `inspect` shows: metadata, graph inputs and outputs, NearestCode nodes."""
    import onnx

    from vqdeploy import read_metadata
    from vqdeploy.export.functions import DOMAIN, OP_TYPE

    info = read_metadata(path)  # NotAVQDeployModelError for a foreign or broken file
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    function = any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions)
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "metadata": info.as_dict(),
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "nearest_code_nodes": len(nodes),
        "nearest_code_function": function,
        "graph_nodes": len(model.graph.node),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
    }


def _shape_text(shape: list[Any]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def run(args: argparse.Namespace) -> int:
    path = existing_file(args.model, "ONNX file")
    described = describe_onnx(path)
    from vqdeploy.ops import cpu_kernels

    described["cpu_gemm"] = cpu_kernels.describe_search()
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    meta = described["metadata"]
    print(f"{path}  ({described['size_bytes'] / 1024:.1f} KiB, {described['graph_nodes']} nodes, opsets "
          + ", ".join(f"{k} {v}" for k, v in described["opsets"].items()) + ")")
    print()
    keys = ("version", "part", "kind", "num_quantizers", "codebook_size", "dim", "codebook_dim", "heads", "metric",
            "input_layout", "index_dtype", "fused", "opset")
    print(format_table(("metadata", "value"), [(k, meta[k]) for k in keys]))
    if meta["config"]:
        print()
        print(format_table(("config", "value"), sorted(meta["config"].items())))
    if meta["kind"] == "model" or len(meta["quantizers"]) > 1:
        print()
        print(format_table(("quantizer", "kind", "stages", "codes", "dim", "codebook dim", "metric", "tokens output"),
                           [(q["path"] or "(root)", q["kind"], q.get("stages", "-"), q["codebook_size"], q["dim"],
                             q["codebook_dim"], q["metric"], q.get("tokens_output") or "-")
                            for q in meta["quantizers"]]))
    if meta.get("searches"):
        print()
        print(format_table(("search", "quantizer", "codes", "dim", "node", "rows output"),
                           [(s["id"], s["quantizer"] or "(root)", s["codebook_size"], s["dim"], s["node"],
                             s["rows_output"]) for s in meta["searches"]]))
    print()
    rows = [("input", v["name"], v["dtype"], _shape_text(v["shape"])) for v in described["inputs"]]
    rows += [("output", v["name"], v["dtype"], _shape_text(v["shape"])) for v in described["outputs"]]
    print(format_table(("graph", "name", "dtype", "shape"), rows))
    print()
    count = described["nearest_code_nodes"]
    if count and meta["kind"] == "model":
        function = "with" if described["nearest_code_function"] else "WITHOUT"
        print(f"NearestCode nodes: {count} (fused; {function} the model-local function ONNX Runtime inlines)")
        print("Tokens: a whole model runs its graph's ArgMin on ort (certified ties) and vqdeploy's exact search on "
              "torch (runtime.load(..., model=module)); vqdeploy verify checks every search's rows and tokens")
    elif count:
        function = "with" if described["nearest_code_function"] else "WITHOUT"
        print(f"NearestCode nodes: {count} (fused; {function} the model-local function ONNX Runtime inlines)")
        print("Tokens: vqdeploy's runtime (ort, torch) returns the exact argmin (near ties re-solved); a raw "
              "onnxruntime session runs ArgMin: certified ties")
    else:
        print("NearestCode nodes: none (unfused: the nearest-code search is inlined in standard ONNX ops)")
        print("Tokens: ArgMin in ONNX Runtime: certified ties (the exact re-check needs a fused file)")
    print(described["cpu_gemm"])
    return 0



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
