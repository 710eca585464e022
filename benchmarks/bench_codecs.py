"""ONNX Runtime encode of each codec's quantizer: vqdeploy's fused export vs a plain dynamo export.

For EnCodec, DAC, SNAC and Mimi, the codec's own quantizer is built at its published size (random
weights; model hubs are unreachable) and converted with ``vqdeploy.convert``. Two files are timed
on ONNX Runtime (CPUExecutionProvider, one plain InferenceSession each, the same options):

- **plain**: ``torch.onnx.export(dynamo=True)`` of the codec's own encode (batch and time dynamic),
  what a user gets without vqdeploy;
- **fused**: ``vqdeploy.export_onnx(converted, part="encode")``, one ``vqdeploy::NearestCode`` per
  stage.

Each round times both once (interleaved); the ratio is the median of the per-round ratios
plain / fused (> 1: the fused file is faster). Tokens of the two files are compared too.
EnCodec and DAC are the transformers implementations (the encodec and descript-audio-codec
packages do not import beside this project's torch / onnx).

    python benchmarks/bench_codecs.py [--rounds 15] [--seconds 10] [--batch 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table  # noqa: E402

import vqdeploy  # noqa: E402


class _Encode(nn.Module):
    """The codec's own encode of its quantizer, as a user would export it."""

    def __init__(self, quantizer: nn.Module, call):
        super().__init__()
        self.quantizer, self.call = quantizer, call

    def forward(self, x: torch.Tensor):
        return self.call(self.quantizer, x)


@torch.no_grad()
def build(name: str):
    """(quantizer, encode call, frames per second, n_q, description) at the codec's published size."""
    import transformers

    torch.manual_seed(0)
    if name == "encodec":  # 24 kHz model: 128-d, K=1024, 6 kbps = 8 stages, 75 frames/s
        config = transformers.EncodecConfig()
        q = transformers.models.encodec.modeling_encodec.EncodecResidualVectorQuantizer(config)
        for layer in q.layers:
            layer.codebook.embed.normal_()
        return q, lambda m, x: m.encode(x, bandwidth=6.0), 75, 8, "EnCodec 24 kHz, D=128, K=1024, 8 stages (6 kbps)"
    if name == "dac":  # 44 kHz model: 1024-d latent, 9 stages, K=1024, code dim 8, 86 frames/s
        config = transformers.DacConfig(n_codebooks=9, codebook_size=1024, codebook_dim=8)
        q = transformers.models.dac.modeling_dac.DacResidualVectorQuantizer(config)
        for stage in q.quantizers:
            nn.utils.parametrizations.weight_norm(stage.in_proj)
            nn.utils.parametrizations.weight_norm(stage.out_proj)
            stage.codebook.weight.normal_()
        return q, lambda m, x: m(x)[1], 86, 9, "DAC 44 kHz, D=1024, K=1024, d=8, 9 stages"
    if name == "snac":  # 24 kHz model: 768-d latent, K=4096, code dim 8, strides 4, 2, 1; 47 frames/s
        from snac.vq import ResidualVectorQuantize

        q = ResidualVectorQuantize(input_dim=768, codebook_size=4096, codebook_dim=8, vq_strides=[4, 2, 1])
        for stage in q.quantizers:
            stage.codebook.weight.normal_()
        return q, lambda m, x: tuple(m(x)[1]), 47, 3, "SNAC 24 kHz, D=768, K=4096, d=8, strides 4/2/1"
    # Mimi: 512-d, 256-d codes, K=2048, 8 of 32 stages (Moshi's), 12.5 frames/s
    config = transformers.MimiConfig()
    q = transformers.models.mimi.modeling_mimi.MimiSplitResidualVectorQuantizer(config)
    for half in (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer):
        for layer in half.layers:
            layer.codebook.embed_sum.normal_()
            layer.codebook._embed = None
    return q, lambda m, x: m.encode(x, num_quantizers=8), 12.5, 8, "Mimi, D=512, d=256, K=2048, 8 of 32 stages"


def export_plain(quantizer: nn.Module, call, example: torch.Tensor, path: Path) -> str:
    wrapper = _Encode(quantizer, call).eval()
    try:
        torch.onnx.export(wrapper, (example,), str(path), dynamo=True,
                          dynamic_shapes=({0: Dim.DYNAMIC, 2: Dim.DYNAMIC},), verbose=False)
        return "dynamic"
    except Exception:  # a time axis the exporter cannot keep symbolic: static shapes
        torch.onnx.export(wrapper, (example,), str(path), dynamo=True, verbose=False)
        return "static"


def main() -> None:
    import onnx
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--codecs", default="encodec,dac,snac,mimi")
    args = parser.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    print(f"CPU: {model_name}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{torch.get_num_threads()} threads; batch {args.batch}, {args.seconds:g} s of audio; {args.rounds} rounds")
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for name in args.codecs.split(","):
        quantizer, call, rate, n_q, what = build(name)
        quantizer.eval()
        converted = vqdeploy.convert(quantizer).eval()
        frames = int(args.seconds * rate)
        step = max(getattr(converted, "strides", [1]))
        frames -= frames % step
        dim = converted.dim
        x = torch.randn(args.batch, dim, frames)
        example = torch.randn(2, dim, 4 * step)
        plain_path = tmp / f"{name}_plain.onnx"
        shapes = export_plain(quantizer, call, example, plain_path)
        if shapes == "static":
            plain_path.unlink()
            export_plain(quantizer, call, x, plain_path)
        fused_path = vqdeploy.export_onnx(converted, tmp / f"{name}_fused.onnx", part="encode",
                                          n_q=None if name == "snac" else n_q)
        plain_ops = sorted({n.op_type for n in onnx.load(str(plain_path)).graph.node} & {"CDist", "MatMul", "ArgMax", "ArgMin", "Gemm"})
        sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                    for k, p in (("plain", plain_path), ("fused", fused_path))}
        feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
        seconds = {k: [] for k in sessions}
        results = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for k in ("plain", "fused"):
                start = time.perf_counter()
                results[k] = sessions[k].run(None, feeds[k])
                if r:
                    seconds[k].append(time.perf_counter() - start)
        ratios = [p / f for p, f in zip(seconds["plain"], seconds["fused"], strict=True)]
        plain_tokens = np.concatenate([np.asarray(t).reshape(-1) for t in results["plain"]])
        fused_tokens = np.concatenate([np.asarray(t).reshape(-1) for t in results["fused"]])
        agree = float((plain_tokens == fused_tokens).mean()) if plain_tokens.shape == fused_tokens.shape else float("nan")
        rows.append([
            name, what, f"{frames}", shapes, ",".join(plain_ops),
            f"{np.median(seconds['plain']) * 1e3:.2f}", f"{np.median(seconds['fused']) * 1e3:.2f}",
            f"{np.median(ratios):.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}", f"{agree:.4%}",
        ])
        print(f"  {name}: done", flush=True)
    print()
    print(markdown_table(
        ["codec", "quantizer", "frames", "plain axes", "plain search ops", "plain ms", "fused ms",
         "plain / fused (median of rounds)", "range", "tokens equal"],
        rows,
    ))


if __name__ == "__main__":
    main()
