"""`vqdeploy bench`: throughput of an export on each backend (the timing itself is vqdeploy.bench)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqdeploy.cli.common import (
    UsageError,
    add_device,
    add_precision,
    bounded_int,
    existing_file,
    positive_int,
)
from vqdeploy.cli.output import format_table, progress, rate, ratio

# The largest --n: 2^27 vectors (32 GiB of float32 input at D = 64) is more than any machine benches.
MAX_BENCH_VECTORS = 2**27

NAME = "bench"
HELP = "Throughput of an export on each backend."
EPILOG = """\
examples:
  vqdeploy bench vq.onnx                                        # every installed CPU backend
  vqdeploy bench vq.onnx --checkpoint vq.safetensors            # + ratio against eager PyTorch
  vqdeploy bench vq.onnx --backends ort --n 262144 --repeats 5
  vqdeploy bench vq.onnx --backends trt,ort --device cuda

Throughput is the best of --repeats timed calls (after one warm-up) on N random vectors in the
graph's layout, in vectors per second. With faiss installed (pip install faiss-cpu), the ratio
against faiss.IndexFlatL2(D).search(x, 1) on the same codebook is shown too.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="CKPT",
                        help="the quantizer's checkpoint, for the ratio against eager PyTorch")
    parser.add_argument("--backends", default=None, metavar="LIST",
                        help="comma-separated, from ort,torch,trt (default: every installed one for the device)")
    add_device(parser)
    add_precision(parser)
    parser.add_argument("--n", type=bounded_int(MAX_BENCH_VECTORS), default=65536, metavar="N",
                        help=f"vectors per call (default 65536, at most {MAX_BENCH_VECTORS})")
    parser.add_argument("--repeats", type=positive_int, default=3, metavar="R", help="timed calls per backend (default 3)")


def parse_backends(text: str | None, device: str) -> list[str]:
    """--backends: a comma-separated list of known backends; default every installed one for `device`."""
    from vqdeploy import runtime

    if text is None:
        return [b for b in runtime.available_backends() if b != "trt" or device.startswith("cuda")]
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in runtime.BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"choose from {', '.join(runtime.BACKENDS)}")
    return names


# One bench call allocates the input (N x D float32) and each backend's outputs; refuse sizes that
# cannot fit before allocating anything.
MAX_BENCH_BYTES = 8 << 30


def run(args: argparse.Namespace) -> int:
    from vqdeploy import load_quantizer, read_metadata
    from vqdeploy.bench import bench_export

    path = existing_file(args.model, "ONNX file")
    info = read_metadata(path)
    if info.kind == "model":
        raise UsageError(f"{path} is a whole user model; bench runs exports of a bare quantizer "
                         "(vqdeploy export CHECKPOINT -o OUT.onnx)")
    backends = parse_backends(args.backends, args.device)
    if args.n * max(info.dim, 1) * 4 > MAX_BENCH_BYTES:
        raise UsageError(f"--n {args.n} needs {args.n * info.dim * 4 / 2**30:.0f} GiB of input alone; "
                         f"choose at most {MAX_BENCH_BYTES // (4 * max(info.dim, 1))} vectors")
    module = None
    if args.checkpoint is not None:
        module = load_quantizer(existing_file(args.checkpoint, "checkpoint"))
        if type(module).__name__ != info.kind:
            raise UsageError(f"the checkpoint holds a {type(module).__name__}, the ONNX file a {info.kind}")

    steps = (len(backends) + (module is not None)) * args.repeats
    with progress(total=steps, desc="bench", quiet=args.quiet, unit="call") as bar:
        timings = bench_export(path, info, backends, device=args.device, precision=args.precision, tokens=args.n,
                               repeats=args.repeats, module=module, tick=bar.update, status=bar.set_postfix_str)
    eager = next((t.seconds for t in timings if t.name == "eager torch"), None)
    faiss = next((t.seconds for t in timings if t.name.startswith("faiss")), None)
    rows = [(t.name, t.device, t.call, rate(t.vectors_per_second), ratio(eager / t.seconds) if eager else "-",
             ratio(faiss / t.seconds) if faiss else "-") for t in timings]
    print(f"{path}: {info.kind} {info.part}, N={args.n} vectors of dim {info.dim}, K={info.codebook_size}, "
          f"best of {args.repeats}")
    print(format_table(("backend", "device", "call", "vectors/s", "vs eager", "vs faiss"), rows, right=(3, 4, 5)))
    if args.device == "cpu":
        from vqdeploy.ops import cpu_kernels

        print(cpu_kernels.describe_search(measure_now=True))
    if module is None:
        print("(pass --checkpoint CKPT for the ratio against eager PyTorch)")
    if faiss is None and info.part != "decode":
        print("(pip install faiss-cpu for the ratio against faiss.IndexFlatL2)")
    return 0
