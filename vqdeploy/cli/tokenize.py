"""`vqdeploy tokenize`: a corpus of vectors to parquet token files, on one process, dask or Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

from vqdeploy.cli.common import positive_int

NAME = "tokenize"
HELP = "Tokenize a corpus of vectors into parquet files, on one process, dask or Ray."
EPILOG = """\
examples:
  vqdeploy tokenize vq_encode.onnx corpus/ -o tokens/                   # every .parquet/.npy in corpus/
  vqdeploy tokenize vq_encode.onnx a.parquet b.parquet -o tokens/ --column emb --id-column key
  vqdeploy tokenize vq_encode.onnx corpus/ -o tokens/ --engine dask --workers 8
  vqdeploy tokenize vq_encode.onnx corpus/ -o tokens/ --engine ray --address auto --verify-sample 10000

MODEL is an export with part encode (or quantize). INPUT: parquet files with a list-of-floats
column (fixed-size lists read zero-copy), .npy arrays of shape (N, D), or folders of them. OUT is a
folder of part-SSSSS.parquet files (id, tokens) whose metadata names the model (sha256, K, stages).
Run the same command again after a crash: finished shards are kept, the rest are encoded.
"""


def run(args: argparse.Namespace) -> int:
    from vqdeploy.tokenize import tokenize_corpus

    if not args.debug:
        import logging

        logging.getLogger("ray").setLevel(logging.WARNING)
    report = tokenize_corpus(
        args.model, args.inputs, args.output, engine=args.engine, address=args.address, workers=args.workers,
        column=args.column, id_column=args.id_column, verify_sample=args.verify_sample, shard_rows=args.shard_rows,
        backend=args.backend, threads_per_worker=args.threads_per_worker, force=args.force,
        progress=False if args.quiet else None, seed=args.seed,
    )
    verified = f", {report.verified_rows} re-encoded rows identical" if report.verified_rows else ""
    print(f"{report.rows} vectors -> {report.output_dir} ({report.shards} shards: {report.shards_written} written, "
          f"{report.shards_skipped} already there{verified}) in {report.seconds:.1f} s on {report.engine}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vqdeploy.tokenize import ENGINES

    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help=".parquet or .npy files, or folders of them")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="the folder to write")
    parser.add_argument("--engine", choices=ENGINES, default="local", help="default local (this process)")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="a running cluster: dask scheduler (tcp://host:8786) or Ray (auto, ray://host:10001)")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="dask threads or Ray actors (default: CPUs)")
    parser.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="T",
                        help="backend threads per worker (default 1; local: the backend's default)")
    parser.add_argument("--column", default=None, metavar="NAME", help="the vector column (default: the only list column)")
    parser.add_argument("--id-column", default=None, metavar="NAME",
                        help="copied to the output (default: row numbers, 'id')")
    parser.add_argument("--verify-sample", type=int, default=0, metavar="N",
                        help="re-encode N random rows here after the job; fail on any difference")
    parser.add_argument("--shard-rows", type=positive_int, default=1 << 20, metavar="N",
                        help="rows per output file (parquet: whole row groups; default 1048576)")
    parser.add_argument("--backend", choices=("ort", "torch"), default="ort", help="default ort")
    parser.add_argument("--seed", type=int, default=0, help="seed of --verify-sample's rows")
    parser.add_argument("--force", action="store_true", help="discard what OUT holds and start over")
