"""ONNX Runtime: the NearestCode re-check body as MatMul + Mul + Add (what vqdeploy ships) against a
single ``Gemm(x, C, ||C||^2, alpha=-2, beta=1, transB=1)``, each at chunks of 1M, 2M (the runtime's
default, `vqdeploy.runtime.base.CHUNK_SCORE_BUDGET`) and 4M scores.

Both bodies compute the score ``fl(||c||^2 - 2 fl(x.c))`` (alpha = -2 is exact), so tokens and
re-check flags must agree; the script checks that they do on every chunk. Sessions are plain
``onnxruntime.InferenceSession`` on the CPU EP over the model vqdeploy's ORT runner builds at load
(`vqdeploy.export.functions.with_recheck_outputs`). Timed interleaved (see `harness`); ratios are
medians of per-round ratios against the shipped body at the default chunk (above 1: faster).

Run: ``python benchmarks/bench_ort_graphs.py [--sizes 4 2 ...] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from bench_eager import SIZES, environment, parse_size
from harness import markdown_table, time_interleaved
from onnx import helper

import vqdeploy
from vqdeploy.export import functions

BUDGETS = (2**20, 2**21, 2**22)  # scores per chunk


def gemm_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with MatMul -> Mul(-2) -> Add replaced by one Gemm (and no Transpose)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    function = model.functions[0]
    dropped = {"dots_m2", "scores", "cf_t", "minus_two", "dots"}
    nodes = []
    for node in function.node:
        if node.op_type == "MatMul":
            nodes.append(helper.make_node("Gemm", ["xf", "cf", "c_norm"], ["scores"], alpha=-2.0, beta=1.0, transB=1))
        elif not dropped & set(node.output):
            nodes.append(node)
    del function.node[:]
    function.node.extend(nodes)
    return model


def run_size(n: int, d: int, k: int, repeats: int) -> list[list[str]]:
    torch.manual_seed(0)
    vq = vqdeploy.VectorQuantize(dim=d, codebook_size=k).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vq.onnx")
        vqdeploy.export_onnx(vq, path, part="encode")
        shipped, _ = functions.with_recheck_outputs(onnx.load(path), d)
    bodies = {"MatMul+Mul+Add": shipped, "Gemm": gemm_body(shipped)}
    sessions = {name: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for name, m in bodies.items()}
    input_name = sessions["Gemm"].get_inputs()[0].name
    x = np.random.default_rng(1).standard_normal((1, n, d), dtype=np.float32)

    def encode(session, rows):
        return [session.run(None, {input_name: x[:, s : s + rows]}) for s in range(0, n, rows)]

    rows_of = {budget: max(256, budget // k) for budget in BUDGETS}
    same = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(
        encode(sessions["MatMul+Mul+Add"], rows_of[2**21]), encode(sessions["Gemm"], rows_of[2**21]), strict=True))
    calls = {f"{name}, {budget // 2**20}M scores": (lambda s=session, r=rows_of[budget]: encode(s, r))
             for budget in BUDGETS for name, session in sessions.items()}
    timings = time_interleaved(calls, n, repeats=repeats, warmup=1)
    base = timings["MatMul+Mul+Add, 2M scores"].seconds
    table = []
    for name, timing in timings.items():
        ratios = [b / t for b, t in zip(base, timing.seconds, strict=True)]
        table.append([f"{n}x{d}x{k}", name, f"{1e3 * timing.median_s:.0f}",
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                      "yes" if same else "NO"])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=SIZES)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    env = environment()
    print(f"# bench_ort_graphs  {env['date']}  {env['cpu']}  onnxruntime {ort.__version__}  loadavg={env['loadavg_start']}")
    rows = []
    for n, d, k in args.sizes:
        rows += run_size(n, d, k, args.repeats)
        print(f"# {n}x{d}x{k} done, loadavg {os.getloadavg()}", flush=True)
    print(markdown_table(["N x D x K", "body, chunk", "median ms", "speed vs shipped 2M (spread)",
                          "tokens + flags equal"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
