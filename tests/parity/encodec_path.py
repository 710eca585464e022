"""EnCodec's encode path (transformers' EncodecModel, random weights from a small config) with its
quantizer converted by `vqdeploy.convert` (a channel-first ResidualVQ holding the same codebooks and
EMA state; the stages EnCodec uses at a bandwidth are ``n_q`` at call time)."""

from __future__ import annotations

import torch
from torch import nn
from transformers_padding import fix_padding

import vqdeploy

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


class EncodecEncodePath(nn.Module):
    """audio (batch, 1, samples) -> audio codes (batch, stages, frames), as EncodecModel.encode's
    ``audio_codes[0]`` at BANDWIDTH."""

    def __init__(self, encodec: nn.Module, bandwidth: float = BANDWIDTH):
        super().__init__()
        self.encoder = encodec.encoder
        fix_padding(self.encoder)
        self.stages = encodec.quantizer.get_num_quantizers_for_bandwidth(bandwidth)
        self.quantizer = vqdeploy.convert(encodec.quantizer).eval()  # ResidualVQ(channel_last=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        embeddings = self.encoder(audio)  # (batch, hidden, frames): the converted quantizer's layout
        _, indices, _ = self.quantizer(embeddings, n_q=self.stages)  # (stages, batch, frames)
        return indices.transpose(0, 1)
