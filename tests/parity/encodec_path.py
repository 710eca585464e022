"""EnCodec's encode path (transformers' EncodecModel, random weights from a small config) with its
quantizer replaced by a vqdeploy ResidualVQ holding the same codebooks.

The mapping is the smallest honest one, written here because `vqdeploy.convert` is not on this
branch: EnCodec's EncodecEuclideanCodebook keeps the EMA state ``embed``, ``embed_avg``,
``cluster_size`` and ``inited`` per stage, which are exactly the buffers of a vqdeploy EMA codebook
(``_codebook.embed[0]``, ``embed_avg[0]``, ``cluster_size[0]``, ``initted``); its search is the
squared-L2 nearest code (it maximises -(|x|^2 - 2 x.e + |e|^2)) and its residual update
``residual - embed[index]``, as ResidualVQ's without projections.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqdeploy import ResidualVQ

SAMPLING_RATE = 24_000
BANDWIDTH = 6.0  # kbps: 8 stages of 1024 codes at 75 frames/s


def small_encodec(seed: int = 0):
    """A 24 kHz EnCodec with fewer filters than the released one (hop 320, 75 frames/s, K = 1024)."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    config = EncodecConfig(num_filters=8, hidden_size=32, codebook_dim=32, codebook_size=1024,
                           num_lstm_layers=2, target_bandwidths=[1.5, 3.0, BANDWIDTH])
    model = EncodecModel(config).eval()
    # The released weights come from training; the config builds zero codebooks. Codes drawn from
    # the encoder's own frames of noise (plus a little jitter), stage by stage on the residual, make
    # every stage's tokens varied, as a trained codebook's are.
    audio = torch.randn(4, 1, 4 * SAMPLING_RATE) * 0.1  # 1,200 frames for 1,024 codes
    with torch.no_grad():
        residual = model.encoder(audio).transpose(1, 2).reshape(-1, config.hidden_size)
        for layer in model.quantizer.layers:
            book = layer.codebook
            picks = residual[torch.randperm(residual.shape[0])[: config.codebook_size]]
            book.embed.copy_(picks + 0.01 * residual.std() * torch.randn_like(picks))
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
            residual = residual - book.embed[book.quantize(residual)]
    return model


def residual_vq_from_encodec(quantizer: nn.Module, num_quantizers: int) -> ResidualVQ:
    """A vqdeploy ResidualVQ with the first ``num_quantizers`` stages of an EncodecResidualVectorQuantizer."""
    first = quantizer.layers[0].codebook
    size, dim = first.embed.shape
    rvq = ResidualVQ(dim=dim, num_quantizers=num_quantizers, codebook_size=size)
    with torch.no_grad():
        for layer, source in zip(rvq.layers, quantizer.layers[:num_quantizers], strict=True):
            book, encodec = layer._codebook, source.codebook
            book.embed[0].copy_(encodec.embed)
            book.embed_avg[0].copy_(encodec.embed_avg)
            book.cluster_size[0].copy_(encodec.cluster_size)
            book.initted.fill_(bool(encodec.inited.item()))
    return rvq.eval()


def fix_padding(encoder: nn.Module) -> None:
    """Make each EncodecConv1d's padding arithmetic plain Python for a fixed frame.

    transformers keeps stride, kernel size and padding as tensor buffers and computes the padding
    of every call from them, which torch.export cannot trace (a data-dependent guard in
    ``_pad1d``). The same formula on Python ints gives the same padding for a fixed input length:
    that is what exporting with a fixed frame means for this encoder.
    """
    for module in encoder.modules():
        if not hasattr(module, "padding_total") or not hasattr(module, "_get_extra_padding_for_conv1d"):
            continue
        stride, kernel, total = (int(module._buffers.pop(name)) for name in ("stride", "kernel_size", "padding_total"))
        module.stride, module.kernel_size, module.padding_total = stride, kernel, total

        def extra_padding(hidden_states: torch.Tensor, stride=stride, kernel=kernel, total=total) -> int:
            length = hidden_states.shape[-1]
            frames = math.ceil((length - kernel + total) / stride + 1) - 1
            return frames * stride + kernel - total - length

        module._get_extra_padding_for_conv1d = extra_padding


class EncodecEncodePath(nn.Module):
    """audio (batch, 1, samples) -> audio codes (batch, stages, frames), as EncodecModel.encode's
    ``audio_codes[0]`` at BANDWIDTH."""

    def __init__(self, encodec: nn.Module, bandwidth: float = BANDWIDTH):
        super().__init__()
        self.encoder = encodec.encoder
        fix_padding(self.encoder)
        stages = encodec.quantizer.get_num_quantizers_for_bandwidth(bandwidth)
        self.quantizer = residual_vq_from_encodec(encodec.quantizer, stages)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        embeddings = self.encoder(audio)  # (batch, hidden, frames)
        _, indices, _ = self.quantizer(embeddings.transpose(1, 2))  # (stages, batch, frames)
        return indices.transpose(0, 1)
