"""`vqdeploy export`: a checkpoint to ONNX."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vqdeploy.cli.common import add_force, check_writable, existing_file
from vqdeploy.cli.output import progress

NAME = "export"
HELP = "Export a quantizer checkpoint to ONNX."
EPILOG = """\
examples:
  vqdeploy export vq.safetensors -o vq.onnx                      # x -> (vectors, indices)
  vqdeploy export vq.safetensors -o vq_encode.onnx --part encode # x -> indices
  vqdeploy export vq.safetensors -o vq_plain.onnx --unfused      # standard ONNX ops only
  vqdeploy export vq.safetensors -o vq.onnx --force              # replace an existing file

CHECKPOINT is a file written by vqdeploy.save_quantizer(module, path).
"""


def run(args: argparse.Namespace) -> int:
    from vqdeploy import export_onnx, load_quantizer, read_metadata

    checkpoint = existing_file(args.checkpoint, "checkpoint")
    check_writable(args.output, args.force)
    with progress(total=3, desc="export", quiet=args.quiet, unit="step") as bar:
        bar.set_postfix_str("loading checkpoint")
        quantizer = load_quantizer(checkpoint)
        bar.update()
        bar.set_postfix_str(f"exporting {args.part}")
        start = time.perf_counter()
        path = export_onnx(quantizer, args.output, part=args.part, fused=not args.unfused, opset=args.opset,
                           overwrite=args.force)
        seconds = time.perf_counter() - start
        bar.update()
        bar.set_postfix_str("reading back")
        info = read_metadata(path)
        bar.update()
    graph = "fused (vqdeploy::NearestCode)" if info.fused else "unfused (standard ops)"
    print(f"wrote {path}: {info.kind} part={info.part}, {graph}, opset {info.opset}, "
          f"{info.codebook_size} codes x {info.codebook_dim} dims, in {seconds:.1f} s")
    return 0



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vqdeploy.export.functions import MIN_OPSET
    from vqdeploy.export.metadata import PARTS
    from vqdeploy.export.onnx import DEFAULT_OPSET

    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .safetensors file from save_quantizer")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--part", choices=PARTS, default="quantize",
                        help="encode: x -> indices; decode: indices -> vectors; quantize: x -> (vectors, indices) "
                             "(default)")
    parser.add_argument("--unfused", action="store_true",
                        help="inline the nearest-code search in standard ops instead of one NearestCode node")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help=f"ONNX opset (default {DEFAULT_OPSET}, minimum {MIN_OPSET})")
    add_force(parser, "OUT.onnx")
