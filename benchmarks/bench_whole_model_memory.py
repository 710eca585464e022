"""The search's memory inside a whole-model graph: EnCodec's encode path (transformers, a small
random 24 kHz config, its quantizer a vqdeploy ResidualVQ of 8 stages x 1024 codes) on a
10-second clip at 24 kHz, in ONNX Runtime (CPU EP).

Three graphs, each run in a fresh process: the whole model, exported with a fixed 10 s frame; the
same graph cut at the first search's rows (onnx.utils.extract_model: the encoder alone); and the
same ResidualVQ exported alone (part="encode": the 8 searches and residual updates, the nodes the
whole graph holds), fed the clip's 750 rows. The extra memory of a run is the peak RSS during the
run (sampled every 0.5 ms; not ru_maxrss, which a child started from this process inherits from
it) minus the RSS once the session is created and the input allocated. The search's memory
beyond the model is the whole graph's extra minus the encoder's. Rounds alternate the graphs;
medians and ranges are printed, with ONNX Runtime's CPU memory arena on and off.

    python benchmarks/bench_whole_model_memory.py [--rounds 5] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "parity"))  # encodec_path: the EnCodec -> ResidualVQ mapping

CHILD = r"""
import json, sys, threading, time
import numpy as np, onnxruntime as ort, psutil
path, shape, arena = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
process = psutil.Process()
options = ort.SessionOptions()
options.enable_cpu_mem_arena = arena
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
meta = session.get_inputs()[0]
audio = (np.random.default_rng(0).standard_normal(shape) * 0.1).astype(np.float32)
before = process.memory_info().rss
peak, done = [before], False
def sample():
    while not done:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.0005)
thread = threading.Thread(target=sample); thread.start()
start = time.perf_counter()
session.run(None, {meta.name: audio})
seconds = time.perf_counter() - start
done = True; thread.join()
print(json.dumps({"extra": peak[0] - before, "seconds": seconds}))
"""


def measure(path: Path, shape: list[int], arena: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(shape), "1" if arena else "0"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import onnx
    import torch
    from encodec_path import SAMPLING_RATE, EncodecEncodePath, small_encodec

    from vqdeploy import export_onnx, read_metadata

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    samples = int(args.seconds * SAMPLING_RATE)

    folder = Path(tempfile.mkdtemp(prefix="vqdeploy-whole-memory-"))
    model = EncodecEncodePath(small_encodec()).eval()
    whole = export_onnx(model, folder / "encodec_encode.onnx", example_input=torch.randn(1, 1, samples) * 0.1,
                        dynamic_shapes=False, input_names=["audio"])
    info = read_metadata(whole)
    first = info.searches[0]
    encoder = folder / "encoder_only.onnx"
    onnx.utils.extract_model(str(whole), str(encoder), ["audio"], [first["rows_value"]])
    quantizer = export_onnx(model.quantizer, folder / "quantizer_only.onnx", part="encode")
    frames = samples // 320
    print(f"EnCodec encode path: {args.seconds:g} s at {SAMPLING_RATE} Hz = {samples} samples -> {frames} frames x "
          f"{len(info.searches)} stages, K = {first['codebook_size']}, d = {first['dim']}")
    print(f"one stage's N x K float32 scores (the function body's MatMul -> ArgMin): "
          f"{frames * first['codebook_size'] * 4 / 2**20:.2f} MiB")
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(cpu)
    for arena in (True, False):
        results: dict[str, list[dict]] = {"whole": [], "encoder": [], "quantizer only": []}
        for _ in range(args.rounds):
            for name, path, shape in (("whole", whole, [1, 1, samples]), ("encoder", encoder, [1, 1, samples]),
                                      ("quantizer only", quantizer, [1, frames, first["dim"]])):
                results[name].append(measure(path, shape, arena))
        mib = {k: [r["extra"] / 2**20 for r in v] for k, v in results.items()}
        diffs = [w - e for w, e in zip(mib["whole"], mib["encoder"], strict=True)]
        print(f"\nORT CPU EP, memory arena {'on' if arena else 'off'}, {args.rounds} rounds (MiB beyond the loaded session)")
        print(f"{'graph':<22}{'median':>10}{'min':>10}{'max':>10}{'run s':>10}")
        for name, values in mib.items():
            seconds = statistics.median(r["seconds"] for r in results[name])
            print(f"{name:<22}{statistics.median(values):>10.2f}{min(values):>10.2f}{max(values):>10.2f}{seconds:>10.3f}")
        print(f"{'search (whole - enc.)':<22}{statistics.median(diffs):>10.2f}{min(diffs):>10.2f}{max(diffs):>10.2f}")


if __name__ == "__main__":
    main()
