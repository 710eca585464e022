"""`vqdeploy build`: a TensorRT engine for an export, built once and cached."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vqdeploy.cli.common import UsageError, add_precision, existing_file, positive_int
from vqdeploy.cli.output import progress

NAME = "build"
HELP = "Build (and cache) a TensorRT engine for an export."
EPILOG = """\
examples:
  vqdeploy build vq.onnx                                  # exact precision (TF32 off), cached engine
  vqdeploy build vq.onnx --max-tokens 1048576
  vqdeploy build vq.onnx --cache-dir engines/             # where the .engine file goes

Needs TensorRT 10 or later (pip install tensorrt) and a CUDA GPU. The engine is cached by the
hash of the ONNX file, the TensorRT version, the GPU, the plugin (none/jit/aot), the profile and
the vqdeploy/Triton versions; both precisions use the same engine; `vqdeploy verify ...
--backend trt` and vqdeploy.runtime.load(..., backend="trt") reuse it.
"""


def run(args: argparse.Namespace) -> int:
    from vqdeploy import read_metadata
    from vqdeploy.runtime.tensorrt import DEFAULT_MAX_TOKENS, EngineCache, import_tensorrt, profile_shapes

    path = existing_file(args.model, "ONNX file")
    info = read_metadata(path)
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS
    try:
        profile = profile_shapes(info, args.min_tokens, args.opt_tokens, max_tokens)
    except ValueError as error:
        raise UsageError(str(error)) from error
    import_tensorrt()  # BackendNotAvailableError naming what to install, before anything else
    with progress(total=1, desc="building TensorRT engine", quiet=args.quiet, unit="engine") as bar:
        start = time.perf_counter()
        engine = EngineCache(args.cache_dir).get_or_build(path, info, device=args.device, min_tokens=args.min_tokens,
                                                          opt_tokens=args.opt_tokens, max_tokens=max_tokens)
        bar.update()
    print(f"engine {engine.path} (plugin {engine.plugin}, profile min/opt/max {list(profile)}; serves both precisions) "
          f"{'built' if engine.built else 'found in the cache'} in {time.perf_counter() - start:.1f} s")
    return 0



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    add_precision(parser, "accepted for symmetry with verify: TensorRT builds one exact engine (TF32 off) for both")
    parser.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    parser.add_argument("--min-tokens", type=positive_int, default=1, metavar="N", help="smallest chunk of the profile")
    parser.add_argument("--opt-tokens", type=positive_int, default=None, metavar="N",
                        help="chunk TensorRT tunes for (default max)")
    parser.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                        help="largest chunk (default 262144)")
    parser.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="engine cache (default $VQDEPLOY_CACHE/engines or ~/.cache/vqdeploy/engines)")
