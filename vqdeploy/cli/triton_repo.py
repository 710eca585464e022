"""`vqdeploy triton-repo`: an NVIDIA Triton model repository for an export."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqdeploy.cli.common import add_force, existing_file, positive_int

NAME = "triton-repo"
HELP = "Write an NVIDIA Triton model repository (onnxruntime backend) for an export."
EPILOG = """\
examples:
  vqdeploy triton-repo vq_encode.onnx -o models                       # models/vq_encode/{config.pbtxt,1/model.onnx}
  vqdeploy triton-repo vq_encode.onnx -o models --gpu --instances 2   # KIND_GPU, CUDA provider with TF32 off
  vqdeploy triton-repo vq_encode.onnx -o models --max-batch-size 16384 --threads 4 --force

MODEL.onnx is an export of part encode. The repository's graph is token-major, x[N, D] ->
indices[N] (heads: [N, H]; ResidualVQ: [N, Q]), so Triton's dynamic batcher joins requests of any
lengths; --max-batch-size counts tokens. Inside Triton the graph runs without vqdeploy's host
re-check: its tokens are at parity (a differing token is a certified tie), not proven identical.
"""


def run(args: argparse.Namespace) -> int:
    from vqdeploy.serving.triton import write_triton_repository

    model = existing_file(args.model, "model")
    target = write_triton_repository(model, args.output, name=args.name, max_batch_size=args.max_batch_size,
                                     instances=args.instances, gpu=args.gpu, intra_op_threads=args.threads,
                                     max_queue_delay_us=args.max_queue_delay_us, force=args.force)
    print(f"wrote {target}: config.pbtxt and 1/model.onnx for Triton's onnxruntime backend "
          f"({'KIND_GPU, use_tf32=0' if args.gpu else 'KIND_CPU'})")
    return 0




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="an export of part encode")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="REPO", help="the model repository folder")
    parser.add_argument("--name", default=None, help="model name (default: MODEL's file name without .onnx)")
    parser.add_argument("--max-batch-size", type=positive_int, default=None, metavar="N",
                        help="tokens per run (default: vqdeploy's ORT chunk for this codebook)")
    parser.add_argument("--instances", type=positive_int, default=1, metavar="N", help="model instances (default 1)")
    parser.add_argument("--gpu", action="store_true", help="KIND_GPU instances, CUDA provider with use_tf32=0")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="intra-op threads per instance (default 0: ONNX Runtime's choice, one per core)")
    parser.add_argument("--max-queue-delay-us", type=int, default=1000, metavar="US",
                        help="how long the dynamic batcher waits to fill a batch (default 1000)")
    add_force(parser, "REPO/NAME")
