"""`vqdeploy verify`: token parity of an export with the eager quantizer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vqdeploy.cli.common import (
    CommandFailed,
    UsageError,
    add_device,
    add_force,
    add_precision,
    check_writable,
    existing_file,
    positive_int,
)
from vqdeploy.cli.output import one_line

NAME = "verify"
HELP = "Check token parity of an export against the eager quantizer (or the whole eager model)."
EPILOG = """\
examples:
  vqdeploy verify vq.safetensors vq.onnx                         # ONNX Runtime, CPU, default inputs
  vqdeploy verify vq.safetensors vq.onnx --backend torch
  vqdeploy verify vq.safetensors vq.onnx --inputs x.npy --json report.json
  vqdeploy verify vq.safetensors vq.onnx --backend trt --device cuda --precision fast
  vqdeploy verify mycodec.build:encoder codec.onnx --inputs clips.npy   # a whole model
  vqdeploy verify encoder.pt codec.onnx --backend torch                # torch.save(module, "encoder.pt")

Default inputs: real data (scikit-learn's digits, matched to the codebook), random data, exact
ties and graded near-ties. Exit status 0 only when every token is identical to the eager model's
or a certified float32 tie, and decoded vectors match.

A whole-model file (exported from a model with quantizers inside) is checked against the eager
model, named as 'package.module:factory' or 'path/to/file.py:factory' (called with no arguments,
returns the module with its weights) or a module saved whole with torch.save (.pt; unpickled:
only files you trust). Per search: the backend's rows against the eager rows within a tolerance
from the upstream float32 error, and every served token against the eager codebook on those rows.
Its inputs (--inputs) are the model's inputs; by default seeded normal inputs of the traced shapes.
"""


def load_inputs(path: Path) -> Any:
    import numpy as np

    existing_file(path, "inputs file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError / UnpicklingError / OSError for other files
        raise UsageError(f"{path} is not a .npy/.npz array file: {one_line(error)}") from error
    if isinstance(loaded, np.lib.npyio.NpzFile):
        return [loaded[name] for name in loaded.files]
    return loaded


def run(args: argparse.Namespace) -> int:
    from vqdeploy.export.metadata import read_metadata
    from vqdeploy.parity import verify

    model = existing_file(args.model, "ONNX file")
    whole = read_metadata(model).kind == "model"
    if whole:
        from vqdeploy.parity.model_source import load_model_source

        checkpoint = load_model_source(args.checkpoint)
    else:
        checkpoint = existing_file(Path(args.checkpoint), "checkpoint")
    if args.json is not None:
        check_writable(args.json, args.force)
    inputs = load_inputs(args.inputs) if args.inputs is not None else None
    if whole and inputs is not None and not isinstance(inputs, list):
        inputs = [inputs]
    report = verify(checkpoint, model, backend=args.backend, device=args.device, precision=args.precision,
                    inputs=inputs, num_samples=args.num_samples, seed=args.seed)
    print(report.table())
    if args.json is not None:
        from vqdeploy.files import atomic_write

        atomic_write(args.json, lambda tmp: tmp.write_text(report.to_json()), overwrite=args.force)
        print(f"wrote {args.json}")
    if not report.passed:
        raise CommandFailed("parity check failed: " + report.failure_summary())
    return 0



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vqdeploy.runtime import BACKENDS

    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_MODEL",
                        help="a quantizer checkpoint; for a whole-model file, the eager model: module:factory, "
                             "file.py:factory or a torch.save'd module (.pt)")
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="ort", help="default ort")
    add_device(parser)
    add_precision(parser)
    parser.add_argument("--inputs", type=Path, default=None, metavar="FILE.npy",
                        help="inputs in the quantizer's layout, or a whole model's inputs (.npy, or .npz for several)")
    parser.add_argument("--num-samples", type=positive_int, default=2048, metavar="N", help="rows per default input set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="REPORT.json", help="also write the report as JSON")
    add_force(parser, "REPORT.json")
