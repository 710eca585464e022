"""Small real codecs with random weights, built from their own configs / constructors.

Model hubs are unreachable, so every codec is built from a small config with random weights; where
the codec's init leaves codebooks zero (EnCodec, Mimi), they are filled by k-means on the codec's
own quantizer inputs, stage by stage, through the codec's own encode / decode. Each builder returns
``(model, quantizer, latents)``: the latents are what the codec's encode path hands its quantizer
for a short random clip (captured from the codec's own call).

The `encodec` and `descript-audio-codec` packages cannot be imported with the torch this project
pins (encodec needs torchaudio, whose wheels are built for another torch; descript-audiotools pins
protobuf < 3.20, which onnx cannot use), so EnCodec and DAC are tested through transformers'
implementations of the same codecs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from vqdeploy.nn.codebook import kmeans

CODECS = ("encodec", "dac", "snac", "mimi")


def _capture(quantizer: torch.nn.Module, method: str) -> list[torch.Tensor]:
    """Record the first tensor argument of every call of quantizer.`method` (the codec's own call)."""
    seen: list[torch.Tensor] = []
    original = getattr(quantizer, method)

    def wrapped(x, *args, **kwargs):
        seen.append(x.detach().clone())
        return original(x, *args, **kwargs)

    setattr(quantizer, method, wrapped)
    return seen


def _release(quantizer: torch.nn.Module, method: str) -> None:
    delattr(quantizer, method)


def _fill_euclidean_(layers, latents: torch.Tensor, embed_name: str, seed: int) -> None:
    """k-means codebooks, stage by stage, on the residuals of the codec's own encode/decode."""
    generator = torch.Generator().manual_seed(seed)
    residual = latents
    for layer in layers:
        rows = residual.permute(0, 2, 1).reshape(-1, residual.shape[1])
        size = layer.codebook.codebook_size
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        means, _ = kmeans(rows, size, num_iters=4, use_cosine_sim=False)
        getattr(layer.codebook, embed_name).copy_(means)
        if hasattr(layer.codebook, "_embed"):
            layer.codebook._embed = None  # Mimi caches embed_sum / cluster_usage
        residual = residual - layer.decode(layer.encode(residual))


def _quiet():
    return warnings.catch_warnings()


@torch.no_grad()
def build_encodec(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.EncodecConfig(
        sampling_rate=1600, hidden_size=32, num_filters=8, upsampling_ratios=[4, 4], codebook_size=64,
        num_lstm_layers=1, target_bandwidths=[1.2, 2.4, 3.6],
    )
    model = transformers.EncodecModel(config).eval()
    audio = torch.randn(2, 1, 1600)
    latents = model.encoder(audio)
    _fill_euclidean_(model.quantizer.layers, latents, "embed", seed)
    for layer in model.quantizer.layers:
        layer.codebook.embed_avg.copy_(layer.codebook.embed * 2.0)
        layer.codebook.cluster_size.fill_(2.0)
    seen = _capture(model.quantizer, "encode")
    model.encode(audio, bandwidth=3.6)
    _release(model.quantizer, "encode")
    return model, model.quantizer, seen[0]


def _with_unit_codebooks(model):
    """(model, quantizer, latents) of a DAC or SNAC: unit-scale codebook rows, as a trained codec has
    (the config's init leaves them small), and the input its quantizer sees for one second of noise."""
    for stage in model.quantizer.quantizers:
        stage.codebook.weight.normal_()
    audio = torch.randn(2, 1, 1600)
    seen: list[torch.Tensor] = []
    hook = model.quantizer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    model.encode(audio)
    hook.remove()
    return model, model.quantizer, seen[0]


@torch.no_grad()
def build_dac(seed: int = 0, weight_norm: bool = True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.DacConfig(
        encoder_hidden_size=8, downsampling_ratios=[2, 4], decoder_hidden_size=32, n_codebooks=4,
        codebook_size=64, codebook_dim=8, sampling_rate=1600,
    )
    model = transformers.DacModel(config).eval()
    if weight_norm:
        model.apply_weight_norm()
    return _with_unit_codebooks(model)


@torch.no_grad()
def build_snac(seed: int = 0):
    snac = pytest.importorskip("snac")
    torch.manual_seed(seed)
    model = snac.SNAC(
        sampling_rate=1600, encoder_dim=8, encoder_rates=[2, 4], decoder_dim=32, decoder_rates=[4, 2],
        attn_window_size=None, codebook_size=64, codebook_dim=8, vq_strides=[4, 2, 1],
    ).eval()
    return _with_unit_codebooks(model)


@torch.no_grad()
def build_mimi(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.MimiConfig(
        sampling_rate=1600, hidden_size=32, num_filters=8, upsampling_ratios=[4, 4], codebook_size=64,
        codebook_dim=16, vector_quantization_hidden_dimension=16, num_quantizers=4, num_semantic_quantizers=1,
        upsample_groups=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, sliding_window=16, frame_rate=50.0,
    )
    model = transformers.MimiModel(config).eval()
    audio = torch.randn(2, 1, 1600)
    quantizer = model.quantizer
    seen = _capture(quantizer, "encode")
    model.encode(audio)
    _release(quantizer, "encode")
    latents = seen[0]
    for half in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        projected = half.input_proj(latents) if half.input_proj is not None else latents
        _fill_euclidean_(half.layers, projected, "embed_sum", seed)
    for half in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        for layer in half.layers:  # a non-trivial usage, so that embed = embed_sum / usage is exercised
            layer.codebook.cluster_usage.uniform_(0.5, 2.0)
            layer.codebook.embed_sum.mul_(layer.codebook.cluster_usage[:, None])
            layer.codebook._embed = None
    return model, quantizer, latents


BUILDERS = {"encodec": build_encodec, "dac": build_dac, "snac": build_snac, "mimi": build_mimi}


@torch.no_grad()
def codec_encode(name: str, quantizer: torch.nn.Module, x: torch.Tensor, n_q: int | None = None):
    """The codec's own tokens for its quantizer input x, in the codec's layout."""
    if name == "encodec":
        if n_q is None:
            return quantizer.encode(x)
        bandwidth = n_q * quantizer.frame_rate * torch.log2(torch.tensor(float(quantizer.codebook_size))).item() / 1000
        return quantizer.encode(x, bandwidth=bandwidth)
    if name == "dac":
        return quantizer(x, n_quantizers=n_q)[1]
    if name == "snac":
        return tuple(quantizer(x)[1])
    return quantizer.encode(x, num_quantizers=n_q)


@torch.no_grad()
def codec_decode(name: str, quantizer: torch.nn.Module, codes):
    """The codec's own decode of its tokens back to the quantizer's input space."""
    if name == "encodec":
        return quantizer.decode(codes)
    if name == "dac":
        return quantizer.from_codes(codes)[0]
    if name == "snac":
        return quantizer.from_codes(list(codes))
    return quantizer.decode(codes.transpose(0, 1))  # Mimi's decode takes (b, q, t)
