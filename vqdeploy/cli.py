"""The `vqdeploy` command: export | build | verify | bench | inspect | triton-repo | demo | tokenize.

Every failure ends in ONE line on stderr, ``vqdeploy: error: <message>``, and a non-zero exit
status (2 for a usage error, 1 for anything else); ``--debug`` adds the traceback. Nothing a
user owns is overwritten without ``--force``. Progress bars (tqdm) go to stderr, on a terminal
only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "vqdeploy"
PARTS = ("encode", "decode", "quantize")
PRECISIONS = ("exact", "fast")
BACKEND_CHOICES = ("auto", "ort", "trt", "torch")


class UsageError(Exception):
    """A command line that cannot work (exit status 2)."""


class CommandFailed(Exception):
    """The command ran and its verdict is negative (a parity failure, say): exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of this CLI (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# -- output helpers -----------------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns listed in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])]
    return "\n".join(text.rstrip() for text in lines)


def _rate(value: float | None) -> str:
    """Vectors per second, short: 1.23M, 456k, 789."""
    if value is None or not math.isfinite(value):
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _progress(iterable=None, *, total: int | None = None, desc: str = "", quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr, shown on a terminal only (disable=None) and never with --quiet."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True if quiet else None, leave=False,
                file=sys.stderr)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def _check_writable(path: Path, force: bool, what: str = "file") -> None:
    from vqdeploy.errors import OutputExistsError

    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a {what}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it")


def _existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is not a file")
    return path


def _best_seconds(fn: Callable[[], Any], repeats: int, tick: Callable[[], None] | None = None) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if tick is not None:
            tick()
    return best


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# -- export ---------------------------------------------------------------------------------------------
EXPORT_EPILOG = """\
examples:
  vqdeploy export vq.safetensors -o vq.onnx                      # x -> (vectors, indices)
  vqdeploy export vq.safetensors -o vq_encode.onnx --part encode # x -> indices
  vqdeploy export vq.safetensors -o vq_plain.onnx --unfused      # standard ONNX ops only
  vqdeploy export vq.safetensors -o vq.onnx --force              # replace an existing file

CHECKPOINT is a file written by vqdeploy.save_quantizer(module, path).
"""


def cmd_export(args: argparse.Namespace) -> int:
    from vqdeploy import export_onnx, load_quantizer, read_metadata

    checkpoint = _existing_file(args.checkpoint, "checkpoint")
    _check_writable(args.output, args.force)
    with _progress(total=3, desc="export", quiet=args.quiet, unit="step") as bar:
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


# -- inspect ------------------------------------------------------------------------------------------------
INSPECT_EPILOG = """\
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


def cmd_inspect(args: argparse.Namespace) -> int:
    path = _existing_file(args.model, "ONNX file")
    described = describe_onnx(path)
    from vqdeploy.ops import gemm

    described["cpu_gemm"] = gemm.describe_current()
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
        print(format_table(("quantizer", "kind", "codes", "dim", "codebook dim", "metric"),
                           [(q["path"] or "(root)", q["kind"], q["codebook_size"], q["dim"], q["codebook_dim"], q["metric"])
                            for q in meta["quantizers"]]))
    print()
    rows = [("input", v["name"], v["dtype"], _shape_text(v["shape"])) for v in described["inputs"]]
    rows += [("output", v["name"], v["dtype"], _shape_text(v["shape"])) for v in described["outputs"]]
    print(format_table(("graph", "name", "dtype", "shape"), rows))
    print()
    count = described["nearest_code_nodes"]
    if count:
        function = "with" if described["nearest_code_function"] else "WITHOUT"
        print(f"NearestCode nodes: {count} (fused; {function} the model-local function ONNX Runtime inlines)")
        print("Tokens: vqdeploy's runtime (ort, torch) returns the exact argmin (near ties re-solved); a raw "
              "onnxruntime session runs ArgMin: certified ties")
    else:
        print("NearestCode nodes: none (unfused: the nearest-code search is inlined in standard ONNX ops)")
        print("Tokens: ArgMin in ONNX Runtime: certified ties (the exact re-check needs a fused file)")
    print(described["cpu_gemm"])
    return 0


# -- build ------------------------------------------------------------------------------------------------------
BUILD_EPILOG = """\
examples:
  vqdeploy build vq.onnx                                  # exact precision (TF32 off), cached engine
  vqdeploy build vq.onnx --max-tokens 1048576
  vqdeploy build vq.onnx --cache-dir engines/             # where the .engine file goes

Needs TensorRT 10 or later (pip install tensorrt) and a CUDA GPU. The engine is cached by the
hash of the ONNX file, the TensorRT version, the GPU, the plugin (none/jit/aot), the profile and
the vqdeploy/Triton versions; both precisions use the same engine; `vqdeploy verify ...
--backend trt` and vqdeploy.runtime.load(..., backend="trt") reuse it.
"""


def cmd_build(args: argparse.Namespace) -> int:
    from vqdeploy import read_metadata
    from vqdeploy.runtime.tensorrt import DEFAULT_MAX_TOKENS, EngineCache, import_tensorrt, profile_shapes

    path = _existing_file(args.model, "ONNX file")
    info = read_metadata(path)
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS
    try:
        profile = profile_shapes(info, args.min_tokens, args.opt_tokens, max_tokens)
    except ValueError as error:
        raise UsageError(str(error)) from error
    import_tensorrt()  # BackendNotAvailableError naming what to install, before anything else
    with _progress(total=1, desc="building TensorRT engine", quiet=args.quiet, unit="engine") as bar:
        start = time.perf_counter()
        engine = EngineCache(args.cache_dir).get_or_build(path, info, device=args.device, min_tokens=args.min_tokens,
                                                          opt_tokens=args.opt_tokens, max_tokens=max_tokens)
        bar.update()
    print(f"engine {engine.path} (plugin {engine.plugin}, profile min/opt/max {list(profile)}; serves both precisions) "
          f"{'built' if engine.built else 'found in the cache'} in {time.perf_counter() - start:.1f} s")
    return 0


# -- verify --------------------------------------------------------------------------------------------------------
VERIFY_EPILOG = """\
examples:
  vqdeploy verify vq.safetensors vq.onnx                         # ONNX Runtime, CPU, default inputs
  vqdeploy verify vq.safetensors vq.onnx --backend torch
  vqdeploy verify vq.safetensors vq.onnx --inputs x.npy --json report.json
  vqdeploy verify vq.safetensors vq.onnx --backend trt --device cuda --precision fast

Default inputs: real data (scikit-learn's digits, matched to the codebook), random data, exact
ties and graded near-ties. Exit status 0 only when every token is identical to the eager model's
or a certified float32 tie, and decoded vectors match.
"""


def _load_inputs(path: Path) -> Any:
    import numpy as np

    _existing_file(path, "inputs file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError / UnpicklingError / OSError for other files
        raise UsageError(f"{path} is not a .npy/.npz array file: {_one_line(error)}") from error
    if isinstance(loaded, np.lib.npyio.NpzFile):
        return [loaded[name] for name in loaded.files]
    return loaded


def cmd_verify(args: argparse.Namespace) -> int:
    from vqdeploy.verify import verify

    checkpoint = _existing_file(args.checkpoint, "checkpoint")
    model = _existing_file(args.model, "ONNX file")
    if args.json is not None:
        _check_writable(args.json, args.force)
    inputs = _load_inputs(args.inputs) if args.inputs is not None else None
    report = verify(checkpoint, model, backend=args.backend, device=args.device, precision=args.precision,
                    inputs=inputs, num_samples=args.num_samples, seed=args.seed)
    print(report.table())
    if args.json is not None:
        from vqdeploy.files import atomic_write

        atomic_write(args.json, lambda tmp: tmp.write_text(report.to_json()), overwrite=args.force)
        print(f"wrote {args.json}")
    if not report.passed:
        problems = []
        if report.violations:
            problems.append(f"{report.violations} token(s) differ beyond float32 rounding")
        if not report.vectors_ok:
            problems.append(f"vectors differ by {report.max_vector_rel_diff:.3g} relative")
        raise CommandFailed("parity check failed: " + "; ".join(problems))
    return 0


# -- bench --------------------------------------------------------------------------------------------------------
BENCH_EPILOG = """\
examples:
  vqdeploy bench vq.onnx                                        # every installed CPU backend
  vqdeploy bench vq.onnx --checkpoint vq.safetensors            # + ratio against eager PyTorch
  vqdeploy bench vq.onnx --backends ort --n 262144 --repeats 5
  vqdeploy bench vq.onnx --backends trt,ort --device cuda

Throughput is the best of --repeats timed calls (after one warm-up) on N random vectors in the
graph's layout, in vectors per second. With faiss installed (pip install faiss-cpu), the ratio
against faiss.IndexFlatL2(D).search(x, 1) on the same codebook is shown too.
"""


def bench_input(info, tokens: int, seed: int = 0):
    """Random input of `tokens` tokens in the layout the export's part takes (batch 1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    heads = (info.heads,) if info.heads > 1 else ()
    if info.part == "decode":
        if info.kind == "ResidualVQ" and info.config.get("conventions") == "vector_quantize_pytorch":
            shape: tuple[int, ...] = (1, tokens, info.num_quantizers)
        elif info.kind == "ResidualVQ":
            shape = (info.num_quantizers, 1, tokens)
        elif info.input_layout == "b d h w":
            shape = (1, 1, tokens, *heads)
        else:
            shape = (1, tokens, *heads)
        return torch.randint(0, info.codebook_size, shape, generator=generator)
    if info.input_layout == "b d h w":
        shape = (1, info.dim, 1, tokens)
    elif info.input_layout == "b d n":
        shape = (1, info.dim, tokens)
    else:
        shape = (1, tokens, info.dim)
    return torch.randn(shape, generator=generator)


def _eager_call(module, part: str) -> Callable[[Any], Any]:
    import torch

    def run(x):
        with torch.inference_mode():
            return module.get_output_from_indices(x) if part == "decode" else module(x)

    return run


def _codebooks(module) -> list[Any]:
    """Every codebook (K, d) a forward searches once per token: stages, or separate heads."""
    from vqdeploy.nn import ResidualVQ

    if isinstance(module, ResidualVQ):
        return [layer.codebook.detach() for layer in module.layers]
    codebook = module.codebook.detach()
    return list(codebook) if codebook.ndim == 3 else [codebook] * module.heads


def faiss_seconds(module, tokens: int, repeats: int) -> float | None:
    """Best time of faiss.IndexFlatL2(d).search(rows, 1) over every codebook search of `tokens` tokens."""
    try:
        import faiss
    except ImportError:
        return None
    import numpy as np

    searches = []
    rng = np.random.default_rng(0)
    for codebook in _codebooks(module):
        codes = np.ascontiguousarray(codebook.float().numpy())
        index = faiss.IndexFlatL2(codes.shape[1])
        index.add(codes)
        rows = (rng.standard_normal((tokens, codes.shape[1])) * float(codes.std() or 1.0)).astype(np.float32)
        searches.append((index, rows))
    return _best_seconds(lambda: [index.search(rows, 1) for index, rows in searches], repeats)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from vqdeploy import load_quantizer, read_metadata, runtime

    path = _existing_file(args.model, "ONNX file")
    info = read_metadata(path)
    if info.kind == "model":
        raise UsageError(f"{path} is a whole user model; bench runs exports of a bare quantizer "
                         "(vqdeploy export CHECKPOINT -o OUT.onnx)")
    backends = _parse_backends(args.backends, args.device)
    if args.n < 1 or args.repeats < 1:
        raise UsageError("--n and --repeats must be at least 1")
    module = None
    if args.checkpoint is not None:
        module = load_quantizer(_existing_file(args.checkpoint, "checkpoint"))
        if type(module).__name__ != info.kind:
            raise UsageError(f"the checkpoint holds a {type(module).__name__}, the ONNX file a {info.kind}")
    x = bench_input(info, args.n)

    results: list[tuple[str, str, float | None, str]] = []
    steps = (len(backends) + (module is not None)) * (args.repeats + 1)
    with _progress(total=steps, desc="bench", quiet=args.quiet, unit="call") as bar:
        for name in backends:
            bar.set_postfix_str(name)
            with runtime.load(path, backend=name, device=args.device, precision=args.precision) as quantizer:
                feed = x.to(args.device)
                run = (lambda q=quantizer, f=feed: q.decode(f)) if info.part == "decode" else (
                    lambda q=quantizer, f=feed: q.encode(f))
                seconds = _best_seconds(run, args.repeats, bar.update)
            bar.update()
            results.append((name, args.device, seconds, ""))
        eager_seconds = None
        if module is not None:
            bar.set_postfix_str("eager")
            module = module.to(args.device).eval()
            eager = _eager_call(module, info.part)
            feed = x.to(args.device)
            eager_seconds = _best_seconds(lambda: eager(feed), args.repeats, bar.update)
            bar.update()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    reference = module if module is not None else _quantizer_from_file(path, info)
    faiss_time = faiss_seconds(reference, args.n, args.repeats) if info.part != "decode" else None

    method = "decode" if info.part == "decode" else "encode"
    rows = []
    for name, device, seconds, _ in results:
        rows.append((name, device, method, _rate(args.n / seconds),
                     _ratio(eager_seconds / seconds) if eager_seconds else "-",
                     _ratio(faiss_time / seconds) if faiss_time else "-"))
    if eager_seconds is not None:
        rows.append(("eager torch", args.device, "forward" if info.part != "decode" else "decode",
                     _rate(args.n / eager_seconds), "1.00x", _ratio(faiss_time / eager_seconds) if faiss_time else "-"))
    if faiss_time is not None:
        rows.append(("faiss IndexFlatL2", "cpu", "search(x, 1)", _rate(args.n / faiss_time),
                     _ratio(eager_seconds / faiss_time) if eager_seconds else "-", "1.00x"))
    print(f"{path}: {info.kind} {info.part}, N={args.n} vectors of dim {info.dim}, K={info.codebook_size}, "
          f"best of {args.repeats}")
    print(format_table(("backend", "device", "call", "vectors/s", "vs eager", "vs faiss"), rows, right=(3, 4, 5)))
    if args.device == "cpu":
        from vqdeploy.ops import gemm

        print(gemm.describe_current(measure_now=True))
    if module is None:
        print("(pass --checkpoint CKPT for the ratio against eager PyTorch)")
    if faiss_time is None and info.part != "decode":
        print("(pip install faiss-cpu for the ratio against faiss.IndexFlatL2)")
    return 0


def _quantizer_from_file(path: Path, info):
    import onnx

    from vqdeploy.runtime.torch_backend import rebuild_quantizer

    return rebuild_quantizer(onnx.load(str(path)), info)


def _parse_backends(text: str | None, device: str) -> list[str]:
    from vqdeploy import runtime

    if text is None:
        names = [b for b in runtime.available_backends() if b != "trt" or device.startswith("cuda")]
        return names
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in runtime.BACKENDS]
    if unknown or not names:
        raise UsageError(f"unknown backend {', '.join(map(repr, unknown)) or '(none)'}; "
                         f"choose from {', '.join(runtime.BACKENDS)}")
    return names


# -- demo ---------------------------------------------------------------------------------------------------------
DEMO_EPILOG = """\
examples:
  vqdeploy demo                   # the whole job on the shipped model, in a temporary folder
  vqdeploy demo --quick           # the same with smaller samples (about half the time)
  vqdeploy demo --out demo/       # keep the checkpoint, the ONNX files and the parity reports

The shipped model is a VQ-VAE trained on scikit-learn's 8x8 digits (vqdeploy.examples). The demo
exports its quantizer (encode) fused and unfused and the whole model, runs every backend this
machine has, checks token parity against eager PyTorch with `verify`, and times each backend.
"""

DEMO_FILES = {
    "checkpoint": "digits_vq.safetensors",
    "fused": "digits_vq_encode.onnx",
    "unfused": "digits_vq_encode_unfused.onnx",
    "model": "digits_vqvae.onnx",
    "reports": "parity_reports.json",
}


def _demo_targets(available: list[str], cuda: bool, ort_cuda: bool) -> list[tuple[str, str, str]]:
    """(backend, device, graph) rows the demo runs on this machine."""
    targets = []
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for device in devices:
        for backend in available:
            if backend == "trt" and device == "cpu":
                continue  # TensorRT runs on a GPU only
            if backend == "ort" and device == "cuda" and not ort_cuda:
                continue
            graphs = ("fused",) if backend == "torch" else ("fused", "unfused")  # torch reads weights, not ops
            targets.extend((backend, device, graph) for graph in graphs)
    return targets


@contextlib.contextmanager
def _demo_folder(out: Path | None, force: bool) -> Iterator[Path]:
    if out is None:
        with tempfile.TemporaryDirectory(prefix="vqdeploy-demo-") as tmp:
            yield Path(tmp)
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    clashes = [out / name for name in DEMO_FILES.values() if (out / name).exists()]
    if clashes and not force:
        from vqdeploy.errors import OutputExistsError

        raise OutputExistsError(f"{clashes[0]} already exists; pass --force to replace the demo's files in {out}")
    out.mkdir(parents=True, exist_ok=True)
    yield out


def _whole_model_parity(model, images, onnx_path: Path) -> tuple[dict[str, int], Any, Any]:
    """Tokens of the whole exported model in ONNX Runtime against eager, with ties certified on
    the eager encoder's features; returns the counts, the session and its reconstruction."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from vqdeploy.verify import classify_tokens

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: images.numpy()}
    reconstruction, indices = session.run(None, feed)
    with torch.inference_mode():
        features = model.features(images)
        _, eager_indices = model(images)
    got, want = torch.from_numpy(np.asarray(indices)).reshape(-1), eager_indices.reshape(-1)
    rows = features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]).float()
    stage = classify_tokens(rows, model.quantizer.codebook.detach(), want, got)
    counts = {"tokens": stage.tokens, "identical": stage.identical, "ties": stage.certified_ties, "violations": stage.violations}
    return counts, session, reconstruction


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vqdeploy import export_onnx, runtime, save_quantizer
    from vqdeploy.examples import load_digits_tensor, load_pretrained
    from vqdeploy.verify import default_inputs, verify

    started = time.perf_counter()
    quick = args.quick
    # rows per verify input set, timed calls, digits used for real-data parity and for timing
    num_samples, repeats, real_images, bench_images = (512, 2, 512, 512) if quick else (2048, 5, 1797, 1797)
    cuda = _cuda_available()
    ort_cuda = False
    if "ort" in runtime.available_backends():
        import onnxruntime

        ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    targets = _demo_targets(runtime.available_backends(), cuda, ort_cuda)

    with _demo_folder(args.out, args.force) as folder:
        files = {key: folder / name for key, name in DEMO_FILES.items()}
        steps = 5 + len(targets)
        with _progress(total=steps, desc="demo", quiet=args.quiet, unit="step") as bar:
            def step(text: str) -> None:
                bar.set_postfix_str(text)

            step("loading the shipped model")
            model = load_pretrained()
            vq = model.quantizer
            images = load_digits_tensor()
            with torch.inference_mode():
                features = model.features(images)
            save_quantizer(vq, files["checkpoint"], overwrite=True)
            bar.write(f"model: shipped DigitsVQVAE (VectorQuantize, {vq.codebook_size} codes x {vq.codebook_dim} dims, "
                      f"4x4 tokens per 8x8 digit), {images.shape[0]} scikit-learn digits -> "
                      f"{features.shape[0] * features.shape[2] * features.shape[3]} tokens")
            bar.update()

            for key, fused in (("fused", True), ("unfused", False)):
                step(f"exporting encode ({key})")
                export_onnx(vq, files[key], part="encode", fused=fused, overwrite=True)
                bar.update()
            step("exporting the whole model")
            export_onnx(model, files["model"], example_input=images[:2], overwrite=True)
            bar.update()

            # Parity inputs: the encoder's real features, plus verify's random data, ties and near-ties.
            verify_inputs = [features[:real_images]] + default_inputs(vq, num_samples, seed=0)
            bench_x = features[:bench_images]
            bench_tokens = bench_x.shape[0] * bench_x.shape[2] * bench_x.shape[3]
            step("timing eager PyTorch")
            eager = _eager_call(vq, "encode")
            eager_seconds = _best_seconds(lambda: eager(bench_x), repeats)
            bar.update()

            rows, reports, failures = [], [], []
            for backend, device, graph in targets:
                step(f"{backend} {device} {graph}")
                try:
                    report = verify(vq, files[graph], backend=backend, device=device, inputs=verify_inputs)
                    with runtime.load(files[graph], backend=backend, device=device) as quantizer:
                        x = bench_x.to(device)
                        seconds = _best_seconds(lambda q=quantizer, x=x: q.encode(x), repeats)
                except Exception as error:  # one backend failing must not hide the others' rows
                    if args.debug:
                        traceback.print_exc()
                    failures.append(f"{backend}/{device}/{graph}: {_one_line(error)}")
                    rows.append((backend, device, graph, "error", "-", "-", "-", "-"))
                    bar.update()
                    continue
                reports.append(report.to_dict() | {"graph": graph})
                if not report.passed:
                    failures.append(f"{backend}/{device}/{graph}: {report.violations} violation(s)")
                rows.append((backend, device, graph if backend != "torch" else "(weights)",
                             f"{report.identical}/{report.tokens}", report.certified_ties, report.violations,
                             _rate(bench_tokens / seconds), _ratio(eager_seconds / seconds)))
                bar.update()

            step("whole model in ONNX Runtime")
            counts, session, reconstruction = _whole_model_parity(model, images, files["model"])
            whole_images = images[:bench_images]
            feed = {session.get_inputs()[0].name: whole_images.numpy()}
            whole_seconds = _best_seconds(lambda: session.run(None, feed), repeats)
            with torch.inference_mode():
                eager_whole = _best_seconds(lambda: model(whole_images), repeats)
            rows.append(("ort (whole model)", "cpu", "fused", f"{counts['identical']}/{counts['tokens']}", counts["ties"],
                         counts["violations"], _rate(whole_images.shape[0] * 16 / whole_seconds),
                         _ratio(eager_whole / whole_seconds)))
            if counts["violations"]:
                failures.append(f"whole model: {counts['violations']} violation(s)")
            bar.update()
        mse = float(np.mean((np.asarray(reconstruction) - images.numpy()) ** 2))

        from vqdeploy.files import atomic_write

        atomic_write(files["reports"], lambda tmp: tmp.write_text(json.dumps(reports, indent=2)), overwrite=True)
        print()
        print(format_table(("backend", "device", "graph", "tokens identical", "certified ties", "violations",
                            "vectors/s", "vs eager"), rows, right=(3, 4, 5, 6, 7)))
        print()
        print(f"eager PyTorch: {_rate(bench_tokens / eager_seconds)} vectors/s (VectorQuantize eval forward, "
              f"{bench_tokens} tokens); whole model counted in tokens (16 per digit); reconstruction MSE {mse:.4f}")
        skipped = [b for b in runtime.BACKENDS if b not in runtime.available_backends()]
        if not cuda:
            skipped.append("every CUDA row (no GPU here)")
        if skipped:
            print(f"not run on this machine: {', '.join(skipped)}")
        if args.out is not None:
            print(f"files in {folder}: {', '.join(DEMO_FILES.values())}")
        print(f"done in {time.perf_counter() - started:.0f} s")
    if failures:
        raise CommandFailed("demo found problems: " + "; ".join(failures))
    return 0


# -- triton-repo ------------------------------------------------------------------------------------------
TRITON_EPILOG = """\
examples:
  vqdeploy triton-repo vq_encode.onnx -o models                       # models/vq_encode/{config.pbtxt,1/model.onnx}
  vqdeploy triton-repo vq_encode.onnx -o models --gpu --instances 2   # KIND_GPU, CUDA provider with TF32 off
  vqdeploy triton-repo vq_encode.onnx -o models --max-batch-size 16384 --threads 4 --force

MODEL.onnx is an export of part encode. The repository's graph is token-major, x[N, D] ->
indices[N] (heads: [N, H]; ResidualVQ: [N, Q]), so Triton's dynamic batcher joins requests of any
lengths; --max-batch-size counts tokens. Inside Triton the graph runs without vqdeploy's host
re-check: its tokens are at parity (a differing token is a certified tie), not proven identical.
"""


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from vqdeploy.serving.triton import write_triton_repository

    model = _existing_file(args.model, "model")
    target = write_triton_repository(model, args.output, name=args.name, max_batch_size=args.max_batch_size,
                                     instances=args.instances, gpu=args.gpu, intra_op_threads=args.threads,
                                     max_queue_delay_us=args.max_queue_delay_us, force=args.force)
    print(f"wrote {target}: config.pbtxt and 1/model.onnx for Triton's onnxruntime backend "
          f"({'KIND_GPU, use_tf32=0' if args.gpu else 'KIND_CPU'})")
    return 0


# -- parser ----------------------------------------------------------------------------------------------------------
# -- tokenize ---------------------------------------------------------------------------------------------
TOKENIZE_EPILOG = """\
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


def cmd_tokenize(args: argparse.Namespace) -> int:
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


MAIN_EPILOG = """\
commands, with an example each:
  demo     vqdeploy demo                                   the whole job on the shipped model
  export   vqdeploy export vq.safetensors -o vq.onnx       a checkpoint to ONNX
  inspect  vqdeploy inspect vq.onnx                         what an export holds
  verify   vqdeploy verify vq.safetensors vq.onnx           token parity with eager PyTorch
  bench    vqdeploy bench vq.onnx --checkpoint vq.safetensors
  build    vqdeploy build vq.onnx                           a TensorRT engine (needs TensorRT + GPU)
  tokenize vqdeploy tokenize vq.onnx corpus/ -o tokens/       a corpus to token files (local, dask, Ray)
  triton-repo
           vqdeploy triton-repo vq_encode.onnx -o models    an NVIDIA Triton model repository

`vqdeploy COMMAND --help` shows each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and library warnings")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")

    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="Export vector quantizers to ONNX, run them on ONNX Runtime, TensorRT "
                     "or torch, and prove the tokens are the eager model's.", epilog=MAIN_EPILOG,
                     formatter_class=formatter, parents=[common])
    from vqdeploy import __version__

    parser.add_argument("--version", action="version", version=f"vqdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_text: str, epilog: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                  formatter_class=formatter, parents=[common])
        sub.set_defaults(handler=handler)
        return sub

    sub = add("export", "Export a quantizer checkpoint to ONNX.", EXPORT_EPILOG, cmd_export)
    sub.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a .safetensors file from save_quantizer")
    sub.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="the ONNX file to write")
    sub.add_argument("--part", choices=PARTS, default="quantize",
                     help="encode: x -> indices; decode: indices -> vectors; quantize: x -> (vectors, indices) "
                          "(default)")
    sub.add_argument("--unfused", action="store_true",
                     help="inline the nearest-code search in standard ops instead of one NearestCode node")
    sub.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 18, minimum 18)")
    sub.add_argument("--force", action="store_true", help="replace OUT.onnx if it exists")

    sub = add("inspect", "Show what a vqdeploy ONNX file holds.", INSPECT_EPILOG, cmd_inspect)
    sub.add_argument("model", type=Path, metavar="MODEL.onnx")
    sub.add_argument("--json", action="store_true", help="print JSON instead of tables")

    sub = add("build", "Build (and cache) a TensorRT engine for an export.", BUILD_EPILOG, cmd_build)
    sub.add_argument("model", type=Path, metavar="MODEL.onnx")
    sub.add_argument("--precision", choices=PRECISIONS, default="exact",
                     help="accepted for symmetry with verify: TensorRT builds one exact engine (TF32 off) for both")
    sub.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    sub.add_argument("--min-tokens", type=int, default=1, metavar="N", help="smallest chunk of the profile")
    sub.add_argument("--opt-tokens", type=int, default=None, metavar="N", help="chunk TensorRT tunes for (default max)")
    sub.add_argument("--max-tokens", type=int, default=None, metavar="N", help="largest chunk (default 262144)")
    sub.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                     help="engine cache (default $VQDEPLOY_CACHE/engines or ~/.cache/vqdeploy/engines)")

    sub = add("verify", "Check token parity of an export against the eager quantizer.", VERIFY_EPILOG, cmd_verify)
    sub.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    sub.add_argument("model", type=Path, metavar="MODEL.onnx")
    sub.add_argument("--backend", choices=BACKEND_CHOICES, default="ort", help="default ort")
    sub.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    sub.add_argument("--precision", choices=PRECISIONS, default="exact")
    sub.add_argument("--inputs", type=Path, default=None, metavar="FILE.npy",
                     help="inputs in the quantizer's layout (.npy, or .npz for several)")
    sub.add_argument("--num-samples", type=int, default=2048, metavar="N", help="rows per default input set")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--json", type=Path, default=None, metavar="REPORT.json", help="also write the report as JSON")
    sub.add_argument("--force", action="store_true", help="replace REPORT.json if it exists")

    sub = add("bench", "Throughput of an export on each backend.", BENCH_EPILOG, cmd_bench)
    sub.add_argument("model", type=Path, metavar="MODEL.onnx")
    sub.add_argument("--checkpoint", type=Path, default=None, metavar="CKPT",
                     help="the quantizer's checkpoint, for the ratio against eager PyTorch")
    sub.add_argument("--backends", default=None, metavar="LIST",
                     help="comma-separated, from ort,torch,trt (default: every installed one for the device)")
    sub.add_argument("--device", default="cpu")
    sub.add_argument("--precision", choices=PRECISIONS, default="exact")
    sub.add_argument("--n", type=int, default=65536, metavar="N", help="vectors per call (default 65536)")
    sub.add_argument("--repeats", type=int, default=3, metavar="R", help="timed calls per backend (default 3)")

    sub = add("triton-repo", "Write an NVIDIA Triton model repository (onnxruntime backend) for an export.",
              TRITON_EPILOG, cmd_triton_repo)
    sub.add_argument("model", type=Path, metavar="MODEL.onnx", help="an export of part encode")
    sub.add_argument("-o", "--output", type=Path, required=True, metavar="REPO", help="the model repository folder")
    sub.add_argument("--name", default=None, help="model name (default: MODEL's file name without .onnx)")
    sub.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                     help="tokens per run (default: vqdeploy's ORT chunk for this codebook)")
    sub.add_argument("--instances", type=int, default=1, metavar="N", help="model instances (default 1)")
    sub.add_argument("--gpu", action="store_true", help="KIND_GPU instances, CUDA provider with use_tf32=0")
    sub.add_argument("--threads", type=int, default=0, metavar="N",
                     help="intra-op threads per instance (default 0: ONNX Runtime's choice, one per core)")
    sub.add_argument("--max-queue-delay-us", type=int, default=1000, metavar="US",
                     help="how long the dynamic batcher waits to fill a batch (default 1000)")
    sub.add_argument("--force", action="store_true", help="replace REPO/NAME if it exists")

    sub = add("demo", "Export, run, verify and time the shipped example model.", DEMO_EPILOG, cmd_demo)
    sub.add_argument("--quick", action="store_true", help="smaller samples and fewer timing repeats")
    sub.add_argument("--out", type=Path, default=None, metavar="DIR", help="keep the files here (default: a temp dir)")
    sub.add_argument("--force", action="store_true", help="replace the demo's files in DIR")

    sub = add("tokenize", "Tokenize a corpus of vectors into parquet files, on one process, dask or Ray.",
              TOKENIZE_EPILOG, cmd_tokenize)
    sub.add_argument("model", type=Path, metavar="MODEL.onnx")
    sub.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help=".parquet or .npy files, or folders of them")
    sub.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="the folder to write")
    sub.add_argument("--engine", choices=("local", "dask", "ray"), default="local", help="default local (this process)")
    sub.add_argument("--address", default=None, metavar="ADDR",
                     help="a running cluster: dask scheduler (tcp://host:8786) or Ray (auto, ray://host:10001)")
    sub.add_argument("--workers", type=int, default=None, metavar="N", help="dask threads or Ray actors (default: CPUs)")
    sub.add_argument("--threads-per-worker", type=int, default=None, metavar="T",
                     help="backend threads per worker (default 1; local: the backend's default)")
    sub.add_argument("--column", default=None, metavar="NAME", help="the vector column (default: the only list column)")
    sub.add_argument("--id-column", default=None, metavar="NAME", help="copied to the output (default: row numbers, 'id')")
    sub.add_argument("--verify-sample", type=int, default=0, metavar="N",
                     help="re-encode N random rows here after the job; fail on any difference")
    sub.add_argument("--shard-rows", type=int, default=1 << 20, metavar="N",
                     help="rows per output file (parquet: whole row groups; default 1048576)")
    sub.add_argument("--backend", choices=("ort", "torch"), default="ort", help="default ort")
    sub.add_argument("--seed", type=int, default=0, help="seed of --verify-sample's rows")
    sub.add_argument("--force", action="store_true", help="discard what OUT holds and start over")
    return parser


def _quiet_libraries() -> None:
    """ONNX Runtime's C++ log lines stay out of the user's terminal (warnings: see `main`)."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    args.debug = getattr(args, "debug", False)
    args.quiet = getattr(args, "quiet", False)
    if args.command is None:
        sys.stderr.write(f"{PROG}: error: choose a command: export, inspect, verify, bench, build, triton-repo, demo or tokenize "
                         f"(see '{PROG} --help')\n")
        return 2
    from vqdeploy.errors import VQDeployError

    try:
        with warnings.catch_warnings():
            if not args.debug:  # library warnings would break the one-line contract of errors
                warnings.simplefilter("ignore")
                _quiet_libraries()
            return args.handler(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: error: interrupted\n")
        return 130
    except BrokenPipeError:  # `vqdeploy inspect x.onnx | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        if isinstance(error, UsageError):
            sys.stderr.write(f"{PROG}: error: {_one_line(error)}\n")
            return 2
        if isinstance(error, VQDeployError | CommandFailed | OSError):
            sys.stderr.write(f"{PROG}: error: {_one_line(error)}\n")
        else:
            hint = "" if args.debug else " (run with --debug for the traceback)"
            sys.stderr.write(f"{PROG}: error: unexpected {type(error).__name__}: {_one_line(error)}{hint}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
