"""`vqdeploy demo`: export, run, verify and time the shipped example model."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from vqdeploy.cli.common import CommandFailed, UsageError
from vqdeploy.cli.output import format_table, one_line, progress, rate, ratio

NAME = "demo"
HELP = "Export, run, verify and time the shipped example model."
EPILOG = """\
examples:
  vqdeploy demo                   # the whole job on the shipped model, in a temporary folder
  vqdeploy demo --quick           # the same with smaller samples (about half the time)
  vqdeploy demo --out demo/       # keep the checkpoint, the ONNX files and the parity reports

The shipped model is a VQ-VAE trained on scikit-learn's 8x8 digits (vqdeploy.examples). The demo
exports its quantizer (encode) fused and unfused and the whole model, runs every backend this
machine has, checks token parity against eager PyTorch with `verify` (for the whole model: the
encoder's rows within float32 tolerance and every token on them), and times each backend.
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


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vqdeploy import export_onnx, runtime, save_quantizer
    from vqdeploy.bench import best_seconds, eager_call
    from vqdeploy.examples import load_digits_tensor, load_pretrained
    from vqdeploy.parity import default_inputs, verify

    started = time.perf_counter()
    quick = args.quick
    # rows per verify input set, timed calls, digits used for real-data parity and for timing
    num_samples, repeats, real_images, bench_images = (512, 2, 512, 512) if quick else (2048, 5, 1797, 1797)
    cuda = torch.cuda.is_available()
    ort_cuda = False
    if "ort" in runtime.available_backends():
        import onnxruntime

        ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    targets = _demo_targets(runtime.available_backends(), cuda, ort_cuda)

    with _demo_folder(args.out, args.force) as folder:
        files = {key: folder / name for key, name in DEMO_FILES.items()}
        steps = 5 + len(targets)
        with progress(total=steps, desc="demo", quiet=args.quiet, unit="step") as bar:
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
            eager = eager_call(vq, "encode")
            eager_seconds = best_seconds(lambda: eager(bench_x), repeats)
            bar.update()

            rows, reports, failures = [], [], []
            for backend, device, graph in targets:
                step(f"{backend} {device} {graph}")
                try:
                    report = verify(vq, files[graph], backend=backend, device=device, inputs=verify_inputs)
                    with runtime.load(files[graph], backend=backend, device=device) as quantizer:
                        x = bench_x.to(device)
                        seconds = best_seconds(lambda q=quantizer, x=x: q.encode(x), repeats)
                except Exception as error:  # one backend failing must not hide the others' rows
                    if args.debug:
                        traceback.print_exc()
                    failures.append(f"{backend}/{device}/{graph}: {one_line(error)}")
                    rows.append((backend, device, graph, "error", "-", "-", "-", "-"))
                    bar.update()
                    continue
                reports.append(report.to_dict() | {"graph": graph})
                if not report.passed:
                    failures.append(f"{backend}/{device}/{graph}: {report.violations} violation(s)")
                rows.append((backend, device, graph if backend != "torch" else "(weights)",
                             f"{report.identical}/{report.tokens}", report.certified_ties, report.violations,
                             rate(bench_tokens / seconds), ratio(eager_seconds / seconds)))
                bar.update()

            step("whole model in ONNX Runtime")
            # Whole-model parity: every search's rows against the eager encoder's (within the float32
            # tolerance of the layers upstream), every served token against the eager codebook on them.
            whole_report = verify(model, files["model"], backend="ort", inputs=[images[:real_images]])
            reports.append(whole_report.to_dict() | {"graph": "whole model"})
            whole_images = images[:bench_images]
            with runtime.load(files["model"], backend="ort") as whole:
                reconstruction = whole.run(images)["output"]
                whole_seconds = best_seconds(lambda: whole.run(whole_images), repeats)
            with torch.inference_mode():
                eager_whole = best_seconds(lambda: model(whole_images), repeats)
            search = whole_report.searches[0]
            rows.append(("ort (whole model)", "cpu", "fused", f"{whole_report.identical}/{whole_report.tokens}",
                         whole_report.certified_ties, whole_report.violations,
                         rate(whole_images.shape[0] * 16 / whole_seconds), ratio(eager_whole / whole_seconds)))
            if not whole_report.passed:
                failures.append(f"whole model: {whole_report.violations} violation(s) "
                                f"{'; ' + '; '.join(whole_report.problems) if whole_report.problems else ''}")
            bar.update()
        mse = float(np.mean((np.asarray(reconstruction) - images.numpy()) ** 2))

        from vqdeploy.files import atomic_write

        atomic_write(files["reports"], lambda tmp: tmp.write_text(json.dumps(reports, indent=2)), overwrite=True)
        print()
        print(format_table(("backend", "device", "graph", "tokens identical", "certified ties", "violations",
                            "vectors/s", "vs eager"), rows, right=(3, 4, 5, 6, 7)))
        print()
        print(f"eager PyTorch: {rate(bench_tokens / eager_seconds)} vectors/s (VectorQuantize eval forward, "
              f"{bench_tokens} tokens); whole model counted in tokens (16 per digit); reconstruction MSE {mse:.4f}")
        print(f"whole model: encoder rows drift at most {search.max_drift:.3g} from eager (tolerance "
              f"{search.tolerance:.3g}, from the encoder's float32 error {search.eager_error:.3g}); "
              f"{whole_report.differ_from_eager} served tokens differ from eager ({whole_report.tie_crossings} tie "
              f"crossings, {whole_report.violations} violations)")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller samples and fewer timing repeats")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="keep the files here (default: a temp dir)")
    parser.add_argument("--force", action="store_true", help="replace the demo's files in DIR")
